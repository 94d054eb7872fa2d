"""Reference statistics: the real images' Inception mean and covariance that FID compares against.

`python -m dit.eval.ref_stats` makes them from a dataset with the same crop and uint8 quantisation as
the samples; `load_reference` reads them back, and also reads ADM-style reference batches (`mu` and
`sigma`, or images as `arr_0`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dit.errors import UserError
from dit.files import sha256_of


@dataclass(frozen=True)
class Reference:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    count: int
    features: np.ndarray | None  # up to 10,000 of the real features, for precision and recall
    source: str
    sha256: str
    meta: dict = field(default_factory=dict)

    def check(self, dims: int | None = None) -> None:
        """Raises UserError unless mu is (D,) and sigma (D, D), finite, with D = dims when given: the feature
        size of the network that embeds the samples, so a wrong file fails when loaded, not after training."""
        mu, sigma = self.mu, self.sigma
        d = dims if dims is not None else (mu.shape[0] if mu.ndim == 1 else 0)
        needs = f"the network that embeds the samples gives {dims} features" if dims is not None else "FID needs"
        if mu.shape != (d,) or sigma.shape != (d, d):
            problem = f"mu has shape {mu.shape} and sigma {sigma.shape}, but {needs}: mu ({d},) and sigma ({d}, {d})"
        elif self.features is not None and (self.features.ndim != 2 or self.features.shape[1] != d):
            problem = f"its features have shape {self.features.shape}, but mu has {d} dimensions"
        elif not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            problem = "mu or sigma holds NaN or infinite values"
        else:
            return
        raise UserError(
            f"reference statistics {self.source}: {problem}. They come from another feature network or are "
            f"damaged; make them again with the network that embeds the samples (for FID: `python -m "
            f"dit.eval.ref_stats --data IMAGENET100_ROOT --out FILE.npz`)."
        )


def load_reference(path: str | Path, inception=None, dims: int | None = None) -> Reference:
    """A reference `.npz`: ours (`mu`, `sigma`, `count`, `features`, `meta`), ADM's statistics (`mu`,
    `sigma`), or ADM's image batch (`arr_0`, uint8 NHWC: embedded here with `inception`). Checked with
    `Reference.check(dims)`: give dims, the feature size of the network that will embed the samples."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"no reference statistics at {path}. Make them with `python -m dit.eval.ref_stats --data "
            f"IMAGENET100_ROOT --out {path}` (over every training image, center-cropped to 256 as the samples "
            f"are), or pass an ADM reference batch .npz."
        )
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:
        raise UserError(f"{path} is not a readable .npz file ({error}); give reference statistics made by "
                        f"`python -m dit.eval.ref_stats` or an ADM reference batch.") from None
    digest = sha256_of(path)
    if "mu" in data and "sigma" in data:
        features = data["features"] if "features" in data else None
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
        count = int(data["count"]) if "count" in data else -1
        reference = Reference(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), count, features,
                              str(path), digest, meta)
        reference.check(dims)
        return reference
    if "arr_0" in data:
        if inception is None:
            raise UserError(f"{path} holds images (arr_0); computing their statistics needs the Inception network.")
        from dit.eval.metrics import statistics
        images = data["arr_0"]
        features = inception.features(images)
        mu, sigma = statistics(features)
        reference = Reference(mu, sigma, len(images), features[:10_000], str(path), digest, {"from": "arr_0 images"})
        reference.check(dims)
        return reference
    raise UserError(f"{path} has neither mu/sigma nor arr_0 (it has {', '.join(data.files) or 'nothing'}); give "
                    f"reference statistics made by `python -m dit.eval.ref_stats` or an ADM reference batch.")
