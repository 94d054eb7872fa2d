"""Evaluation of the EMA model: N class-balanced samples -> features -> Frechet distance, and a grid.

One evaluator serves the training loop (every `eval.every` steps) and `python -m dit.eval.fid`. With the
FID Inception and ImageNet statistics it is FID-N; with another feature network (the demo's small
classifier) it is a Frechet distance of that network, and carries that network's name, not "fid".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from dit.config import RunConfig
from dit.eval.metrics import frechet_distance, statistics
from dit.eval.reference import Reference
from dit.sample import Decoder, generate_shares, save_grid

GRID_IMAGES = 64


@dataclass
class FrechetEvaluator:
    name: str  # the metric's name: "fid" for the FID Inception
    embed: Callable[[np.ndarray], np.ndarray]  # uint8 images (N, H, W, 3) -> features (N, D)
    reference: Reference
    decoder: Decoder
    run: RunConfig
    graphdef: object
    sample_dir: Path | None = None  # sample grids go here (process 0 only, of its own samples)
    progress: bool = False

    def __call__(self, step: int, ema_params) -> dict:
        """The metric and its timings, for metrics.jsonl: {name: value, name_samples: N, eval_s, ...}."""
        cfg = self.run.eval
        timings: dict = {}
        started = time.perf_counter()
        # The same seed at every evaluation: the curve over steps then compares the same noise.
        samples = generate_shares(self.graphdef, ema_params, self.run.model, self.run.train, cfg,
                                  seed=self.run.train.seed, decoder=self.decoder, progress=self.progress,
                                  timings=timings)
        images = samples.images  # this process's share: each image is embedded once, where it was made
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        features_start = time.perf_counter()
        features = samples.gather(self.embed(images))
        timings["features_s"] = time.perf_counter() - features_start
        mu, sigma = statistics(features)
        value = frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma)
        if self.sample_dir is not None and jax.process_index() == 0:
            self.sample_dir.mkdir(parents=True, exist_ok=True)
            save_grid(samples.images[samples.index < samples.total][:GRID_IMAGES],
                      self.sample_dir / f"step_{step:07d}.png")
        return {self.name: value, f"{self.name}_samples": len(features),
                "eval_s": time.perf_counter() - started, **timings}
