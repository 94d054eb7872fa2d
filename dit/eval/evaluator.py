"""Evaluation: uint8 images -> features -> statistics -> Frechet distance, and of the EMA model, N
class-balanced samples first (and a grid).

`evaluate_images` is the one scoring path: the training loop's evaluations, the sweeps and every form of
`python -m dit.eval.fid` (a run, an .npz, a folder) go through it. With the FID Inception and ImageNet
statistics it is FID-N; with another feature network (the demo's small classifier) it is a Frechet distance
of that network, and carries that network's name, not "fid".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import jax
import numpy as np

from dit.autoencoder import Autoencoder
from dit.config import RunConfig
from dit.errors import UserError
from dit.eval.metrics import frechet_distance, inception_score, precision_recall, statistics
from dit.eval.reference import Reference
from dit.sample import generate_shares, save_grid

GRID_IMAGES = 64


class FeatureNetwork(Protocol):
    """The FID Inception (dit.eval.inception) or the digits classifier (dit.eval.digits_classifier)."""

    def features_and_logits(self, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, H, W, 3) -> features (N, D) and class logits (N, K)."""


def check_count(n: int, source: str) -> None:
    if n < 2:  # a covariance needs 2 samples
        raise UserError(f"{source}: {n} sample image{'' if n == 1 else 's'}, but FID needs at least 2, and a "
                        f"meaningful FID thousands (10,000 for FID-10K, 50,000 for FID-50K).")


def evaluate_images(images: np.ndarray, network: FeatureNetwork, reference: Reference, batch_size: int = 200,
                    gather: Callable[[np.ndarray], np.ndarray] | None = None, name: str = "fid",
                    scores: bool = True) -> dict:
    """The Frechet distance of uint8 images (grey or RGB) to the reference in the network's features:
    {name: distance, "num_samples": N, "features_s": seconds}; with `scores` also the Inception Score of
    the network's logits, and precision/recall where the reference kept its features. With `gather`
    (`Samples.gather`), `images` are this process's share (each image is embedded where it was made) and
    the features of all shares are gathered."""
    started = time.perf_counter()
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    features, logits = network.features_and_logits(images, batch_size=batch_size)
    if gather is not None:
        features, logits = gather(features), gather(logits)
    check_count(len(features), "the samples to evaluate")  # all processes' together
    reference.check(features.shape[-1])
    features_s = time.perf_counter() - started
    mu, sigma = statistics(features)
    result = {name: frechet_distance(mu, sigma, reference.mu, reference.sigma), "num_samples": len(features)}
    if scores:
        result["inception_score"], result["inception_score_std"] = inception_score(logits)
        if reference.features is not None and len(reference.features) > 3 and len(features) > 3:
            result["precision"], result["recall"] = precision_recall(reference.features,
                                                                     features[:len(reference.features)])
    result["features_s"] = features_s
    return result


@dataclass
class FrechetEvaluator:
    name: str  # the metric's name: "fid" for the FID Inception
    network: FeatureNetwork
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
        scored = evaluate_images(samples.images, self.network, self.reference, gather=samples.gather,
                                 name=self.name, scores=False)
        if self.sample_dir is not None and jax.process_index() == 0:
            self.sample_dir.mkdir(parents=True, exist_ok=True)
            save_grid(samples.images[samples.index < samples.total][:GRID_IMAGES],
                      self.sample_dir / f"step_{step:07d}.png")
        return {self.name: scored[self.name], f"{self.name}_samples": scored["num_samples"],
                "eval_s": time.perf_counter() - started, "features_s": scored["features_s"], **timings}


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
        name = "fid"
        real = load_reference(path, network, dims=FEATURES)
    else:
        from dit.eval.digits_classifier import FEATURES, digits_reference, load_or_train
        if data.cache is None:
            raise UserError("eval.metric=fd_digits is the built-in digits' metric and is computed from their latent "
                            "cache (data.cache); with data.images, evaluate FID: --set eval.metric=fid --set "
                            "eval.reference=FILE.npz (from `python -m dit.eval.ref_stats`).")
        network = load_or_train(data.cache.directory)
        name = config.eval.metric
        real = digits_reference(data.cache.directory, network)
        real.check(FEATURES)  # built from the classifier's own features: cheap, and catches a changed head
    graphdef = nnx.split(nnx.eval_shape(lambda: DiT(config.model, rngs=nnx.Rngs(0))))[0]
    return FrechetEvaluator(name, network, real, data.autoencoder, config, graphdef,
                            sample_dir=sample_dir)
