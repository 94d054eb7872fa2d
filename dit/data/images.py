"""Image folders on disk -> a labelled, ordered file list; image files -> ADM center-cropped uint8 RGB.

Two layouts: the Kaggle ImageNet-100 release (train.X1..train.X4, val.X, Labels.json) and a generic
class-per-folder tree. A label is the index of the class folder name in sorted order, so labels and file
order depend only on the names on disk, never on the order a file system lists them.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dit.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".webp"})
KAGGLE_TRAIN = ("train.X1", "train.X2", "train.X3", "train.X4")
KAGGLE_VAL = "val.X"
LABELS_FILE = "Labels.json"
# Up to this many pixels an image is decoded in full, so its crop is exactly ADM's (as the reference
# statistics are); larger JPEGs decode reduced, or a 13000x13000 photo takes 0.5 GB per decoding thread.
FULL_DECODE_PIXELS = 2**24
SPLITS = ("train", "val")
EXPECTED = (
    "either the Kaggle ImageNet-100 layout (train.X1, train.X2, train.X3, train.X4 and val.X, each holding "
    "one folder per WordNet id, plus Labels.json) or one folder per class (root/<class>/*.jpg, or "
    "root/train/<class>/*.jpg and root/val/<class>/*.jpg)"
)


@dataclass(frozen=True)
class ImageSet:
    """The image files of one split, each with its label, in a fixed order."""

    root: Path
    split: str  # "train" or "val"
    layout: str  # "imagenet100" (the Kaggle release) or "folders" (generic class-per-folder)
    classes: tuple[str, ...]  # sorted class folder names; a label is an index into this
    names: dict[str, str]  # class -> human-readable name
    files: tuple[tuple[Path, int], ...]  # (path, label), sorted by (class, file name)

    def __len__(self) -> int:
        return len(self.files)


class BadImage(Exception):
    """A file that cannot be read as an image; the message is a short reason."""


def find_images(root: str | Path, split: str = "train") -> ImageSet:
    """The labelled image files of `split` under `root`, in either layout."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"the image root {root} {what}. Expected a folder holding {EXPECTED}. "
                        f"Point the image root at the folder that holds them.")
    if any((root / name).is_dir() for name in (*KAGGLE_TRAIN, KAGGLE_VAL)):
        layout, (classes, folders) = "imagenet100", _kaggle_folders(root, split)
    else:
        layout, (classes, folders) = "folders", _generic_folders(root, split)

    label = {name: i for i, name in enumerate(classes)}
    files, empty = [], []
    for name in sorted(folders):
        images = _image_files(folders[name])
        files += [(path, label[name]) for path in images]
        if not images:
            empty.append(name)
    if not files:
        raise UserError(f"no images found for split {split!r} under {root}. Expected {EXPECTED}, with "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))} files in the class folders. "
                        f"Found: {_some_entries(root)}. Point the image root at the folder that holds them.")
    if empty:
        raise UserError(f"{len(empty)} class folder(s) of split {split!r} under {root} hold no images: "
                        f"{_few(empty)}. Remove them or add their images, so that labels stay meaningful.")
    return ImageSet(root, split, layout, classes, _read_names(root, classes), tuple(files))


def _kaggle_folders(root: Path, split: str) -> tuple[tuple[str, ...], dict[str, Path]]:
    """Classes (defined by train, for both splits) and this split's class folders, Kaggle layout."""
    missing = [name for name in KAGGLE_TRAIN if not (root / name).is_dir()]
    if missing:
        raise UserError(f"{root} looks like the Kaggle ImageNet-100 layout but lacks {', '.join(missing)}. "
                        f"Expected {EXPECTED}; found: {_some_entries(root)}. Restore the missing folders "
                        f"(the training classes come from all four).")
    train: dict[str, Path] = {}
    # Any further train.X* folders are read too: better than silently dropping classes.
    for part in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("train.X")):
        for name, folder in _class_folders(part).items():
            if name in train:
                raise UserError(f"class {name} appears in both {train[name].parent} and {part} under {root}; "
                                f"each class must be in exactly one train.X folder. Remove one copy.")
            train[name] = folder
    classes = tuple(sorted(train))
    if split == "train":
        return classes, train
    if not (root / KAGGLE_VAL).is_dir():
        raise UserError(f"{root} has no {KAGGLE_VAL} folder for split 'val'. Expected {EXPECTED}; "
                        f"found: {_some_entries(root)}.")
    val = _class_folders(root / KAGGLE_VAL)
    _check_subset(val, classes, root / KAGGLE_VAL)
    return classes, val


def _generic_folders(root: Path, split: str) -> tuple[tuple[str, ...], dict[str, Path]]:
    """Classes and this split's class folders: root/<split>/<class>, or root/<class> for train."""
    if (root / split).is_dir():
        folders = _class_folders(root / split)
    elif split == "train":
        folders = _class_folders(root)
    else:
        raise UserError(f"{root} has no {split} folder (and no {KAGGLE_VAL}). Expected {EXPECTED}; "
                        f"found: {_some_entries(root)}.")
    classes = tuple(sorted(folders))
    # As for Kaggle, the training classes define the labels of both splits when both are on disk.
    if split == "val" and (root / "train").is_dir():
        classes = tuple(sorted(_class_folders(root / "train")))
        _check_subset(folders, classes, root / split)
    return classes, folders


def _check_subset(folders: dict[str, Path], classes: tuple[str, ...], where: Path) -> None:
    extra = sorted(set(folders) - set(classes))
    if extra:
        raise UserError(f"{where} has {len(extra)} class folder(s) that the training split lacks: "
                        f"{_few(extra)}. Labels come from the training classes, so every validation class "
                        f"must also be a training class.")


def _class_folders(parent: Path) -> dict[str, Path]:
    with os.scandir(parent) as entries:
        return {e.name: Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")}


def _image_files(folder: Path) -> list[Path]:
    # os.scandir, not Path.iterdir: ImageNet has ~1,300 files per folder and scandir avoids a stat per file.
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if e.is_file() and not e.name.startswith(".")
                      and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def _read_names(root: Path, classes: tuple[str, ...]) -> dict[str, str]:
    """Class -> human name from root/Labels.json where it has one, else the folder name."""
    path = root / LABELS_FILE
    table: dict = {}
    if path.is_file():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path} is not readable JSON ({error}); it should map WordNet ids to names. "
                            f"Fix or remove it.") from None
        if not isinstance(table, dict):
            raise UserError(f"{path} should be a JSON object mapping WordNet ids to names; fix or remove it.")
    return {name: str(table.get(name, name)) for name in classes}


def _few(names: list[str], shown: int = 6) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _some_entries(folder: Path) -> str:
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name + ("/" if e.is_dir() else "") for e in entries)
    except OSError as error:
        return f"nothing readable ({error.strerror or error})"
    return _few(names) if names else "nothing (the folder is empty)"


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's center crop: halve with BOX while large, BICUBIC so the short side is `resolution`, crop the middle."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    crop_y = (arr.shape[0] - resolution) // 2
    crop_x = (arr.shape[1] - resolution) // 2
    return Image.fromarray(arr[crop_y: crop_y + resolution, crop_x: crop_x + resolution])


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # PIL's convert clips 16-bit values at 255, which turns most of the image white; keep the top 8 bits.
        image = Image.fromarray((np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8))
    # Drops alpha (as ADM does) and maps L, 1, P, CMYK, YCbCr ... to RGB.
    return image.convert("RGB")


def load_image(path: Path, resolution: int) -> np.ndarray:
    """One image file -> uint8 (resolution, resolution, 3) RGB; raises BadImage with a short reason."""
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise BadImage(f"unreadable file ({error.strerror or error})") from None
    if size == 0:
        raise BadImage("empty file")
    try:
        # PIL opens by content, so a PNG named .JPEG is read as the PNG it is.
        with Image.open(path) as image:
            if image.width * image.height > FULL_DECODE_PIXELS:
                # libjpeg's 1/2, 1/4 or 1/8 scale, keeping the short side >= 2 x resolution so that
                # center_crop's BOX halving and BICUBIC step still follow; other formats ignore it.
                image.draft(None, (2 * resolution, 2 * resolution))
            image.load()  # decode everything now: a truncated JPEG fails here, not inside a later resize
            image = _to_rgb(image)
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except Image.DecompressionBombError as error:
        raise BadImage(f"too large ({error})") from None
    except Exception as error:  # broken files raise OSError, and also SyntaxError, ValueError, EOFError...
        raise BadImage(f"truncated or corrupt image ({error})") from None
    # EXIF orientation is ignored on purpose, as in ADM, so crops match the reference statistics.
    return np.asarray(center_crop(image, resolution))


def load_images(image_set: ImageSet, indices, resolution: int,
                workers: int | None = None) -> tuple[np.ndarray, np.ndarray, list[tuple[Path, str]]]:
    """Load files `indices` of `image_set`: (images of the good ones, their indices, [(path, reason)] of the bad).

    A thread pool decodes in parallel: PIL releases the GIL while decoding and resizing.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)

    def load(index: int) -> np.ndarray | str:
        try:
            return load_image(image_set.files[index][0], resolution)
        except BadImage as error:
            return str(error)

    workers = workers or _cpu_count()
    with ThreadPoolExecutor(max_workers=max(1, min(len(indices), workers))) as pool:
        results = list(pool.map(load, indices.tolist()))
    good = [i for i, result in enumerate(results) if isinstance(result, np.ndarray)]
    bad = [(image_set.files[indices[i]][0], result) for i, result in enumerate(results) if isinstance(result, str)]
    images = (np.stack([results[i] for i in good]) if good
              else np.zeros((0, resolution, resolution, 3), np.uint8))
    return images, indices[good], bad


def _cpu_count() -> int:
    # The cores this process may use, which in a container can be fewer than the machine has.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
