"""Evaluation of the EMA model: N class-balanced samples -> features -> Frechet distance, and a grid.

One evaluator serves the training loop (every `eval.every` steps) and the sweeps of `python -m dit.eval.fid
--run`. With the FID Inception and ImageNet statistics it is FID-N; with another feature network (the demo's
small classifier) it is a Frechet distance of that network, and carries that network's name, not "fid".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from dit.config import RunConfig
from dit.errors import UserError
from dit.eval.metrics import frechet_distance, statistics
from dit.eval.reference import Reference
from dit.autoencoder import Autoencoder
from dit.sample import generate_shares, save_grid

GRID_IMAGES = 64


@dataclass
class FrechetEvaluator:
    name: str  # the metric's name: "fid" for the FID Inception
    embed: Callable[[np.ndarray], np.ndarray]  # uint8 images (N, H, W, 3) -> features (N, D)
    reference: Reference
    decoder: Autoencoder  # the run's: what made its training latents
    run: RunConfig
    graphdef: object
    sample_dir: Path | None = None  # sample grids go here (process 0 only, of its own samples)
    progress: bool = False
    seed: int | None = None  # of the sampling noise; None: train.seed

    def __call__(self, step: int, ema_params) -> dict:
        """The metric and its timings, for metrics.jsonl: {name: value, name_samples: N, eval_s, ...}."""
        cfg = self.run.eval
        timings: dict = {}
        started = time.perf_counter()
        # The same seed at every evaluation: the curve over steps (and a sweep's settings) compare the same noise.
        seed = self.run.train.seed if self.seed is None else self.seed
        samples = generate_shares(self.graphdef, ema_params, self.run.model, self.run.train, cfg, seed=seed,
                                  decoder=self.decoder, progress=self.progress, timings=timings)
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


def build_evaluator(config: RunConfig, data, sample_dir: Path | None = None, reference: str = "",
                    inception: str = "") -> FrechetEvaluator:
    """The metric of a run's data (`data`: its `dit.data.source.TrainingData`): FID with the Inception
    (eval.reference, eval.inception), or the digits classifier's Frechet distance. A `reference` (and
    `inception`) given here evaluate FID against them whatever the run's own metric."""
    from flax import nnx

    from dit.model import DiT
    if config.eval.metric == "fid" or reference:
        from dit.eval.inception import FEATURES, load_inception
        from dit.eval.reference import load_reference
        path = reference or config.eval.reference
        if not path:
            raise UserError("eval.metric=fid needs reference statistics: make them with `python -m dit.eval.ref_stats "
                            "--data IMAGENET100_ROOT --out FILE.npz` and pass --set eval.reference=FILE.npz.")
        network = load_inception(inception or config.eval.inception or None)
        name, embed = "fid", network.features
        real = load_reference(path, network, dims=FEATURES)
    else:
        from dit.eval.digits_classifier import FEATURES, digits_reference, load_or_train
        if data.cache is None:
            raise UserError("eval.metric=fd_digits is the built-in digits' metric and is computed from their latent "
                            "cache (data.cache); with data.images, evaluate FID: --set eval.metric=fid --set "
                            "eval.reference=FILE.npz (from `python -m dit.eval.ref_stats`).")
        classifier = load_or_train(data.cache.directory)
        name, embed = config.eval.metric, classifier.features
        real = digits_reference(data.cache.directory, classifier)
        real.check(FEATURES)  # built from the classifier's own features: cheap, and catches a changed head
    graphdef = nnx.split(nnx.eval_shape(lambda: DiT(config.model, rngs=nnx.Rngs(0))))[0]
    return FrechetEvaluator(name, embed, real, data.autoencoder, config, graphdef,
                            sample_dir=sample_dir)
