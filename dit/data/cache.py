"""The latent cache: every training image encoded once, original and flipped, as posterior mean and std.

Layout of a cache directory:

    extract.json            the settings it is being built with (a restart must use the same ones)
    shard-00000/            one directory per run of `shard_size` consecutive source files
        mean.npy, std.npy   (n, 2, h, w, c), index 1 of axis 1 is the horizontally flipped image
        repa.npy            (n, tokens, dim) int8, only with --repa-encoder: the DINOv2 features of the
                            unflipped image that REPA aligns with, each token scaled to its largest value
                            (REPA's loss sees only their directions)
        label.npy           (n,) int32
        index.npy           (n,) int64, the file's position in the sorted file list
        stats.json          per-channel sums of the means, and the files this shard skipped
    manifest.json           written last, once every shard exists: what training reads

Records are plain `.npy` arrays, read through memory maps: fixed-size records give random access
for shuffling with no index or extra dependency, and any numpy can open them. A shard is written into
a temporary directory and renamed into place, so a shard directory that exists is complete; a run
killed mid-shard leaves only a temporary directory, which the next run deletes and redoes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from dit.errors import UserError
from dit.files import write_json_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "extract.json"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_ranges(num_files: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, num_files)) for start in range(0, num_files, shard_size)]


@dataclass
class Shard:
    """One shard's arrays before they are written."""

    mean: np.ndarray  # (n, 2, h, w, c)
    std: np.ndarray
    label: np.ndarray
    index: np.ndarray
    skipped: list[tuple[str, str]]  # (path, reason)
    repa: np.ndarray | None = None  # (n, tokens, dim) int8 REPA targets

    def stats(self) -> dict:
        means = self.mean.astype(np.float64).reshape(-1, self.mean.shape[-1])
        return {"count": len(self.label), "values": int(means.shape[0]),
                "sum": means.sum(0).tolist(), "sum_sq": np.square(means).sum(0).tolist(),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def write_shard(directory: Path, k: int, shard: Shard) -> None:
    """Writes shard k atomically: into a temporary directory, then renamed into place."""
    final = directory / shard_name(k)
    tmp = directory / f".tmp-{shard_name(k)}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name in ("mean", "std", "label", "index", "repa"):
            if getattr(shard, name) is not None:
                _save_npy(tmp / f"{name}.npy", getattr(shard, name))
        (tmp / "stats.json").write_text(json.dumps(shard.stats()))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # on a full disk, free what the half-written shard took
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
        # Another process finished the same shard first; its copy is identical, keep it.


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through Python's writes: numpy's own C writer reports a full disk as "N requested and M
    written" with no errno, and callers need OSError ENOSPC to say what happened."""
    with open(path, "wb") as file:
        np.lib.format.write_array(SimpleNamespace(write=file.write), array, allow_pickle=False)


def remove_partial_shards(directory: Path, owned: set[int]) -> None:
    """Deletes temporary directories a killed run left behind, for the shards this process owns."""
    for tmp in directory.glob(".tmp-shard-*"):
        if int(tmp.name.split("-")[2]) in owned:
            shutil.rmtree(tmp, ignore_errors=True)


def finished_shards(directory: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in directory.glob("shard-*") if p.is_dir()}


def build_manifest(directory: Path, settings: dict, classes: list[str], names: dict[str, str],
                   latent_shape: tuple[int, ...], num_shards: int) -> dict:
    """Combines the finished shards into manifest.json (written atomically) and returns it."""
    shards, skipped = [], []
    total, values = 0, 0
    channel_sum = np.zeros(latent_shape[-1])
    channel_sum_sq = np.zeros(latent_shape[-1])
    for k in range(num_shards):
        stats = json.loads((directory / shard_name(k) / "stats.json").read_text())
        shards.append({"name": shard_name(k), "count": stats["count"]})
        total += stats["count"]
        values += stats["values"]
        channel_sum += stats["sum"]
        channel_sum_sq += stats["sum_sq"]
        skipped += stats["skipped"]
    if not total:  # never marked complete: training on it would fail far from the cause
        reasons = Counter(item["reason"].split(" (")[0] for item in skipped)
        raise UserError(
            f"none of the {len(skipped)} image files could be read ("
            + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
            + (f"; e.g. {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else "")
            + f"), so no cache was made: {directory} has no {MANIFEST} and training refuses it. Fix or replace "
            f"the files (or point at the right folder), delete {directory} and extract again.")
    channel_mean = channel_sum / max(values, 1)
    channel_std = np.sqrt(np.maximum(channel_sum_sq / max(values, 1) - channel_mean**2, 0.0))
    manifest = {
        "format": FORMAT_VERSION,
        "count": total,
        "latent_shape": list(latent_shape),
        "classes": classes,
        "names": names,
        "shards": shards,
        "skipped": skipped,
        # Of the posterior means, unscaled, over both flips: what the scale factor should normalise.
        "latent_channel_mean": channel_mean.tolist(),
        "latent_channel_std": channel_std.tolist(),
        **settings,
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


class LatentCache:
    """Read access to a finished cache, memory-mapped: record i -> (mean (2, h, w, c), std, label),
    or a batch of records at once (`read`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            if (self.directory / SETTINGS).is_file():
                done = len(finished_shards(self.directory))
                raise UserError(
                    f"the latent cache {self.directory} is unfinished ({done} shards written, no manifest.json): "
                    f"run the same `python -m dit.data.extract ... --out {self.directory}` command again; it "
                    f"keeps the finished shards and completes the rest."
                )
            raise UserError(
                f"no latent cache at {self.directory} (expected {manifest_path}). Build one with "
                f"`python -m dit.data.extract --data IMAGENET100_ROOT --vae stabilityai/sd-vae-ft-ema --out "
                f"{self.directory}`, or set data.cache to an existing cache."
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT_VERSION:
            raise UserError(f"the latent cache {self.directory} has format {self.manifest.get('format')}, this "
                            f"version reads format {FORMAT_VERSION}; extract it again into a new directory.")
        self.scale_factor = float(self.manifest["scale_factor"])
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.num_classes = len(self.manifest["classes"])
        self._shards: list[dict] | None = None  # memory maps, opened on the first read
        self._items: list[dict] | None = None  # the same maps viewed as one opaque item per record, for `read`
        if not self.manifest["count"]:  # otherwise training fails later, far from the cause
            raise UserError(
                f"the latent cache {self.directory} holds no images ({len(self.manifest.get('skipped', []))} "
                f"source files were skipped as unreadable, listed under \"skipped\" in {manifest_path}): nothing "
                f"to train on. Extract a folder of readable images into a new directory.")
        self.has_repa = bool(self.manifest.get("repa"))
        arrays = ("mean", "std", "label") + (("repa",) if self.has_repa else ())
        missing = [f"{s['name']}/{name}.npy" for s in self.manifest["shards"] for name in arrays
                   if not (self.directory / s["name"] / f"{name}.npy").is_file()]
        if missing:
            raise UserError(
                f"the latent cache {self.directory} is incomplete: {len(missing)} of the files its manifest lists "
                f"are missing ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}). Copy the whole "
                f"cache directory again, or extract it again into a new directory.")
        counts = [s["count"] for s in self.manifest["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.labels = np.concatenate([np.load(self.directory / s["name"] / "label.npy")
                                      for s in self.manifest["shards"]])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _open(self) -> list[dict]:
        if self._shards is None:
            shards = [{name: self._map(s, name) for name in ("mean", "std")} for s in self.manifest["shards"]]
            dtype = shards[0]["mean"].dtype  # one dtype throughout: a batch is one array
            for s, arrays in zip(self.manifest["shards"], shards):
                expected = (s["count"], 2, *self.latent_shape)
                for name, array in arrays.items():
                    if array.shape != expected or array.dtype != dtype:
                        raise UserError(
                            f"the latent cache {self.directory} is damaged: {s['name']}/{name}.npy holds "
                            f"{array.dtype} {array.shape}, where its manifest and first shard say {dtype} "
                            f"{expected}. Copy the whole cache directory again, or extract it again into a "
                            f"new directory.")
            if self.has_repa:
                for s, arrays in zip(self.manifest["shards"], shards):
                    arrays["repa"] = self._map(s, "repa")
                    if arrays["repa"].dtype != np.int8 or len(arrays["repa"]) != s["count"]:
                        raise UserError(
                            f"the latent cache {self.directory} is damaged: {s['name']}/repa.npy holds "
                            f"{arrays['repa'].dtype} {arrays['repa'].shape}, where int8 ({s['count']}, tokens, dim) "
                            f"is expected. Extract it again into a new directory.")
            self._shards = shards
        return self._shards

    def _map(self, shard: dict, name: str) -> np.ndarray:
        path = self.directory / shard["name"] / f"{name}.npy"
        try:
            return np.asarray(np.load(path, mmap_mode="r"))  # a plain view: np.memmap adds overhead per index
        except (ValueError, OSError) as error:  # truncated, or not an .npy file at all
            raise UserError(f"the latent cache {self.directory} is damaged: {path} cannot be read ({error}). "
                            f"Copy the whole cache directory again, or extract it again into a new "
                            f"directory.") from None

    @property
    def dtype(self) -> np.dtype:
        """The stored dtype of the means and stds (float16 by default, as `extract` writes them)."""
        return self._open()[0]["mean"].dtype

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        shard, row = self._open()[k], i - self._starts[k]
        return shard["mean"][row], shard["std"][row], int(self.labels[i])

    def read(self, records: np.ndarray, flips: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Records -> (mean (n, flips, h, w, c), std, label (n,)) in the records' order; `flips=1` reads
        only the unflipped images. One gather per shard the records fall in, not a read per record."""
        records = self._check(records)
        # One allocation for both: glibc keeps a freed block this large for the next batch, where it gave two
        # half-size ones back to the kernel each time (measured: 1,000 page faults a batch, more than the copy).
        # Whole records (both flips) are gathered, as contiguous items; `flips=1` returns a view of the first.
        both = _aligned_empty((2, len(records), 2, *self.latent_shape), self.dtype)
        for out, name in zip(both, ("mean", "std")):
            self._gather(records, name, out)
        return both[0, :, :flips], both[1, :, :flips], self.labels[records].astype(np.int32)

    @property
    def repa_shape(self) -> tuple[int, int]:
        """(tokens, dim) of the REPA targets; a UserError naming the fix when the cache has none."""
        if not self.has_repa:
            raise UserError(
                f"the latent cache {self.directory} holds no REPA targets (train.repa_weight > 0 needs them): "
                f"extract the images again with `python -m dit.data.extract ... --repa-encoder "
                f"DINOV2_SAFETENSORS --out NEW_DIR`, or set train.repa_weight=0.")
        return tuple(self._open()[0]["repa"].shape[1:])

    def read_repa(self, records: np.ndarray) -> np.ndarray:
        """Records -> their int8 REPA targets (n, tokens, dim), in the records' order."""
        shape = self.repa_shape
        records = self._check(records)
        return self._gather(records, "repa", _aligned_empty((len(records), *shape), np.int8))

    def _check(self, records) -> np.ndarray:
        records = np.asarray(records)
        if len(records) and not 0 <= records.min() <= records.max() < len(self):
            raise IndexError(f"records outside 0..{len(self) - 1} of the cache {self.directory}")
        return records

    def _gather(self, records: np.ndarray, name: str, out: np.ndarray) -> np.ndarray:
        """Copies array `name` of the records into `out` (n, ...), one gather per shard."""
        if self._items is None:
            self._items = [{key: _as_items(a) for key, a in s.items()} for s in self._open()]
        order = np.argsort(records)  # grouped by shard, ascending within one
        ascending = records[order]
        bounds = np.searchsorted(ascending, self._starts).tolist()  # shard k: ascending[bounds[k]:bounds[k + 1]]
        rows = ascending - np.repeat(self._starts[:-1], np.diff(bounds))
        items = _as_items(out)
        for k in range(len(bounds) - 1):
            if bounds[k + 1] > bounds[k]:
                at = slice(bounds[k], bounds[k + 1])
                items[order[at]] = self._items[k][name][rows[at]]
        return out


def _as_items(array: np.ndarray) -> np.ndarray:
    """(n, ...) -> a view of n opaque items, one a record: numpy gathers these 1.6 times as fast as the
    float16 records themselves (measured on this project's 2-core machine)."""
    size = math.prod(array.shape[1:])
    return array.reshape(len(array), size).view(np.dtype((np.void, size * array.itemsize)))[:, 0]


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty on a 64-byte boundary (numpy's own are 16-byte): JAX's CPU backend then uses a batch's
    arrays where they are instead of copying them onto the device. A batch is never written after it is read."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)
