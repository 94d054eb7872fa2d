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
from dit.errors import UserError

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
    """The demo's cache directory, root/cache-<resolution>, built on first use; returns its path."""
    return digits_cache(Path(root) / f"cache-{resolution}", resolution, progress)


def digits_cache(cache: Path, resolution: int, progress: bool = True) -> Path:
    """The digits' cache at `cache`, built on first use (images, then pixel 'latents'; the images beside it,
    in cache.parent/images); returns its path. A directory there that holds something else is an error:
    the built-in data is never written over a user's files."""
    from dit.data.extract import extract

    cache = Path(cache)
    if not (cache / MANIFEST).is_file():
        if cache.is_dir() and any(cache.iterdir()):
            raise UserError(f"data.builtin=digits builds the digits' cache in {cache}, which holds other files and no "
                            f"cache manifest. Point data.cache at a new directory, or, to train on your own cache "
                            f"there, leave data.builtin empty (--set data.builtin=).")
        images = write_digits(cache.parent)
        extract(images, PixelAutoencoder(), cache, resolution=resolution, batch_size=256, shard_size=512,
                dtype="float32", name="digits", progress=progress)
    return cache
