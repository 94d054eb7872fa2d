"""The numbers computed from features: Frechet distance, Inception Score, precision and recall.

All on the CPU in float64 (numpy), from features a network produced on the accelerator.
"""

from __future__ import annotations

import numpy as np


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as numpy's np.cov and pytorch-fid) of (N, D) features, float64."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


class MomentAccumulator:
    """Streaming mean and covariance in float64, for feature sets too large to hold at once."""

    def __init__(self, dim: int):
        self.count, self.total, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, np.float64)
        self.count += len(features)
        self.total += features.sum(0)
        self.outer += features.T @ features

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

    pytorch-fid takes a general matrix square root of the product (scipy's sqrtm), which at Inception's
    2048 dimensions costs seconds of host time after every evaluation. Only its trace is needed, and for
    covariances it has an exact form that is several times cheaper: with s = sqrt(sigma1) the product is
    similar to s sigma2 s, which is symmetric positive semidefinite, so the trace is the sum of the square
    roots of that matrix's eigenvalues. Equal to pytorch-fid's value to 1e-9, and to 1e-6 with fewer samples
    than dimensions, where pytorch-fid adds 1e-6 to the diagonals (tests/test_metrics.py).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different shapes: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    values, basis = np.linalg.eigh(sigma1)
    root1 = (basis * np.sqrt(_covariance_eigenvalues(values))) @ basis.T
    product = root1 @ sigma2 @ root1
    trace_root = np.sum(np.sqrt(_covariance_eigenvalues(np.linalg.eigvalsh((product + product.T) / 2))))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def _covariance_eigenvalues(values: np.ndarray) -> np.ndarray:
    """A covariance's eigenvalues with the rounding below zero set to zero; a clearly negative one means the
    statistics are not covariances: an error rather than a wrong number."""
    if values.min() < -1e-6 * max(values.max(), 1e-30):
        raise ValueError(f"a covariance has the eigenvalue {values.min():.3g} (largest {values.max():.3g}); the "
                         f"statistics are not valid covariances")
    return np.clip(values, 0.0, None)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` equal parts (Salimans et al.), float64."""
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, min(splits, len(p))):
        marginal = part.mean(0, keepdims=True)
        kl = np.sum(part * (np.log(np.maximum(part, 1e-30)) - np.log(np.maximum(marginal, 1e-30))), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0.0)


def _knn_radii(features: np.ndarray, k: int, chunk: int) -> np.ndarray:
    radii = np.empty(len(features))
    for start in range(0, len(features), chunk):
        d = _squared_distances(features[start:start + chunk], features)
        radii[start:start + chunk] = np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself
    return radii


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int) -> float:
    inside = 0
    for start in range(0, len(queries), chunk):
        d = _squared_distances(queries[start:start + chunk], support)
        inside += int(np.any(d <= radii[None, :], axis=1).sum())
    return inside / len(queries)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour balls:
    precision is the share of fake samples inside the real manifold, recall the share of real inside the fake."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall
