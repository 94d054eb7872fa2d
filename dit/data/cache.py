"""The latent cache: every training image encoded once, original and flipped, as posterior mean and std.

Layout of a cache directory:

    extract.json            the settings it is being built with (a restart must use the same ones)
    shard-00000/            one directory per run of `shard_size` consecutive source files
        mean.npy, std.npy   (n, 2, h, w, c), index 1 of axis 1 is the horizontally flipped image
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
        for name in ("mean", "std", "label", "index"):
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
    """Read access to a finished cache: record i -> (mean (2, h, w, c), std, label), memory-mapped."""

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
        self._shards: list[dict] | None = None  # opened lazily: each worker process maps its own
        if not self.manifest["count"]:  # otherwise training fails later, far from the cause
            raise UserError(
                f"the latent cache {self.directory} holds no images ({len(self.manifest.get('skipped', []))} "
                f"source files were skipped as unreadable, listed under \"skipped\" in {manifest_path}): nothing "
                f"to train on. Extract a folder of readable images into a new directory.")
        missing = [f"{s['name']}/{name}.npy" for s in self.manifest["shards"] for name in ("mean", "std", "label")
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
            self._shards = [{name: np.load(self.directory / s["name"] / f"{name}.npy", mmap_mode="r")
                             for name in ("mean", "std")} for s in self.manifest["shards"]]
        return self._shards

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        shard, row = self._open()[k], i - self._starts[k]
        return shard["mean"][row], shard["std"][row], int(self.labels[i])

    def __getstate__(self):  # picklable for grain's worker processes; memory maps reopen there
        return {**self.__dict__, "_shards": None}
