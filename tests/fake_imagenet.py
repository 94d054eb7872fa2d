"""Tiny fake image trees for tests: the Kaggle ImageNet-100 layout (with the odd files real ImageNet has) and
a generic class-per-folder layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

# Varied shapes, landscape and portrait, so crops and resizes see both.
SIZES = ((40, 30), (30, 50), (64, 64))


def random_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth colour gradient plus noise (width, height): compresses like a photo, unlike pure noise."""
    w, h = size
    ramp = np.add.outer(np.linspace(0, 1, h), np.linspace(0, 1, w))[..., None] * rng.uniform(40, 120, 3)
    noise = rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(rng.uniform(0, 120, 3) + ramp + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def truncated_jpeg(rng: np.random.Generator) -> bytes:
    """A valid JPEG cut halfway through its scan data, so the header still parses and the decode fails."""
    data = jpeg_bytes(random_image(rng, (64, 64)), quality=95)
    start_of_scan = data.index(b"\xff\xda")
    return data[: (start_of_scan + len(data)) // 2]


def make_fake_imagenet(root: Path, classes_per_split=(2, 1, 1, 1), images_per_class: int = 3,
                       val_per_class: int = 2, size: tuple[int, int] = (40, 30), bad: bool = True,
                       seed: int = 0) -> dict:
    """Write root/train.X1..4, root/val.X and root/Labels.json; return what was written.

    The returned dict: classes (sorted wnids), names, train / val (how many image files find_images should
    list), bad ({path: expected reason prefix}), odd ({kind: path} of the unusual files that must load).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    sizes = (tuple(size), *SIZES[1:])
    wnids = [f"n{k * 1013 + 1:08d}" for k in range(sum(classes_per_split))]
    # train.X1 gets the last wnids, so sorted labels differ from the order of the folders.
    folders = [f"train.X{i + 1}" for i, n in enumerate(classes_per_split) for _ in range(n)]
    train_dirs = {}
    for part in ("train.X1", "train.X2", "train.X3", "train.X4"):
        (root / part).mkdir(parents=True, exist_ok=True)
    for wnid, part in zip(reversed(wnids), folders):
        train_dirs[wnid] = root / part / wnid
        train_dirs[wnid].mkdir()
        for i in range(images_per_class):
            random_image(rng, sizes[i % len(sizes)]).save(train_dirs[wnid] / f"{wnid}_{i + 1}.JPEG", quality=90)
    for k, wnid in enumerate(wnids):
        (root / "val.X" / wnid).mkdir(parents=True)
        for i in range(val_per_class):
            name = f"ILSVRC2012_val_{k * val_per_class + i + 1:08d}.JPEG"
            random_image(rng, sizes[(i + 1) % len(sizes)]).save(root / "val.X" / wnid / name, quality=90)
    names = {wnid: f"fake class {k}, Fakeus {k}" for k, wnid in enumerate(wnids)}
    (root / "Labels.json").write_text(json.dumps(names, indent=1))

    info = {"classes": sorted(wnids), "names": names, "train": len(wnids) * images_per_class,
            "val": len(wnids) * val_per_class, "bad": {}, "odd": {}}
    if not bad:
        return info
    # The odd files sit in different classes; real ImageNet has all of these.
    first, second, third = (train_dirs[wnids[k % len(wnids)]] for k in range(3))
    odd = {"grayscale": first / "gray.JPEG", "cmyk": second / "cmyk.JPEG", "png": third / "png.JPEG"}
    random_image(rng, (40, 30)).convert("L").save(odd["grayscale"], "JPEG")
    random_image(rng, (30, 40)).convert("CMYK").save(odd["cmyk"], "JPEG")
    random_image(rng, (36, 36)).save(odd["png"], "PNG")
    broken = {first / "truncated.JPEG": "truncated or corrupt image", second / "empty.JPEG": "empty file"}
    paths = list(broken)
    paths[0].write_bytes(truncated_jpeg(rng))
    paths[1].write_bytes(b"")
    # Files find_images must skip: hidden, and not an image extension.
    (first / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (first / "notes.txt").write_text("not an image")
    info.update(train=info["train"] + len(odd) + len(broken), bad=broken, odd=odd)
    return info


def make_class_folders(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (16, 16),
                       seed: int = 0) -> dict:
    """Write root/<class>/<i>.{jpg,png}: the generic layout; return {"classes": sorted names, "count": files}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    # Created in reverse name order so the sorted labels cannot come from creation order.
    names = [f"class_{chr(ord('a') + k)}" for k in range(classes)]
    for name in reversed(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            extension = ".png" if i % 2 else ".jpg"
            random_image(rng, size).save(root / name / f"{i:03d}{extension}")
    return {"classes": names, "count": classes * per_class}
