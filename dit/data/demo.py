"""The built-in demo dataset: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), no download.

Written once as a class-per-folder tree of PNGs, it then goes through the same reader, center crop
and cache code as ImageNet-100, with the identity (pixel) autoencoder in place of the SD-VAE, so the
whole pipeline runs end to end on a laptop CPU.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from dit.autoencoder import PixelAutoencoder
from dit.data.cache import MANIFEST

DEMO_RESOLUTION = 16  # the 8x8 digits upsampled by the ADM crop's bicubic resize


def write_digits(root: Path) -> Path:
    """Writes root/images/<digit>/<n>.png once (atomically); returns the image root."""
    from sklearn.datasets import load_digits  # its data ships inside the package

    images = Path(root) / "images"
    if images.is_dir():
        return images
    digits = load_digits()
    tmp = Path(root) / f".images-{uuid.uuid4().hex}"
    for n, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = tmp / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # 0..16 ink -> white digits on black, 8-bit grayscale (the reader converts it to RGB).
        Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), "L").save(folder / f"{n:04d}.png")
    try:
        os.rename(tmp, images)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return images


def demo_cache(root: str | Path = "data/digits", resolution: int = DEMO_RESOLUTION, progress: bool = True) -> Path:
    """The demo's cache directory, built on first use (images, then pixel 'latents'); returns its path."""
    from dit.data.extract import extract

    root = Path(root)
    cache = root / f"cache-{resolution}"
    if not (cache / MANIFEST).is_file():
        images = write_digits(root)
        extract(images, PixelAutoencoder(), cache, resolution=resolution, batch_size=256, shard_size=512,
                dtype="float32", name="digits", progress=progress)
    return cache
