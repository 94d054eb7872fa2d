"""`python -m dit.eval.ref_stats --data ROOT --out FILE.npz`: FID reference statistics of a dataset.

Every image of the split is center-cropped exactly as the samples are produced (ADM crop to
`--resolution`, uint8), embedded with the FID Inception, and reduced to the mean and covariance
(float64, streamed) plus a fixed random subset of 10,000 features for precision and recall.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dit.data.images import find_images, load_images
from dit.errors import UserError, check_sizes, report
from dit.eval.metrics import MomentAccumulator

KEPT_FEATURES = 10_000


def reference_statistics(data: str | Path, inception, out: str | Path, *, resolution: int = 256,
                         split: str = "train", batch_size: int = 250, keep: int = KEPT_FEATURES,
                         progress: bool = True) -> dict:
    """Writes the statistics to `out` (a new file, written atomically) and returns their description."""
    check_sizes({"--resolution": (resolution, 256), "--batch": (batch_size, 250)})
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; reference statistics are never overwritten. Choose another --out.")
    image_set = find_images(data, split)
    print(f"found {len(image_set):,} {split} images in {len(image_set.classes)} classes under {image_set.root}")
    n = len(image_set)
    kept_indices = np.sort(np.random.default_rng(0).choice(n, size=min(keep, n), replace=False))
    moments = MomentAccumulator(2048)
    kept, skipped = [], []
    start = time.perf_counter()
    bar = tqdm(total=n, disable=not progress, desc="reference", unit="img")
    batches = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    with ThreadPoolExecutor(1) as reader:  # decodes the next batch while the network runs on this one
        pending = reader.submit(load_images, image_set, batches[0], resolution) if batches else None
        for i in range(len(batches)):
            images, good, bad = pending.result()
            if i + 1 < len(batches):
                pending = reader.submit(load_images, image_set, batches[i + 1], resolution)
            skipped += [{"path": str(p), "reason": r} for p, r in bad]
            if len(good):
                features = inception.features(images, progress=False)
                moments.add(features)
                kept.append(features[np.isin(good, kept_indices)])
            bar.update(len(batches[i]))
    bar.close()
    if moments.count < 2:
        raise UserError(f"fewer than 2 readable images under {image_set.root}; reference statistics need many.")
    mu, sigma = moments.statistics()
    meta = {
        "data": str(image_set.root), "split": split, "resolution": resolution, "count": moments.count,
        "skipped": skipped, "inception_sha256": getattr(inception, "sha256", None),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{uuid.uuid4().hex}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, count=moments.count, features=np.concatenate(kept).astype(np.float32),
             meta=json.dumps(meta))
    os.replace(tmp, out)
    elapsed = time.perf_counter() - start
    print(f"wrote {out}: {moments.count:,} images in {elapsed:.1f} s ({moments.count / elapsed:.1f} img/s)"
          + (f"; skipped {len(skipped)} unreadable files (listed in its meta)" if skipped else ""))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.eval.ref_stats", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset root (Kaggle ImageNet-100 layout or class folders)")
    parser.add_argument("--out", required=True, help="the .npz to write (must not exist)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--inception", default=None,
                        help="pt_inception-2015-12-05-6726825d.pth or its converted copy (default: the cached download)")
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args(argv)
    try:
        check_sizes({"--resolution": (args.resolution, 256), "--batch": (args.batch, 250)})
        from dit.eval.inception import load_inception
        reference_statistics(args.data, load_inception(args.inception), args.out, resolution=args.resolution,
                             split=args.split, batch_size=args.batch)
    except UserError as error:
        return report(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
