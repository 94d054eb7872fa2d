"""Encode a training split once into the latent cache: `python -m dit.data.extract --data ROOT --vae VAE --out DIR`.

Every image is center-cropped (ADM), encoded as is and horizontally flipped, on this process's
devices, and stored as posterior mean and std, so training draws a fresh latent each time it reads
one. Resumable: finished shards are kept, the rest redone. Multi-process safe: process p encodes the
shards k with k % P == p, and the process that finds every shard present writes the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from dit.autoencoder import Autoencoder, from_uint8, load_autoencoder
from dit.data import cache as latent_cache
from dit.data.images import ImageSet, find_images, load_images
from dit.errors import UserError, check_sizes, report
from dit.files import is_disk_full
from dit.mesh import BATCH_AXIS, data_mesh
from dit.repa import int8_directions

# What the real ImageNet-100 holds; printed next to what was found, so a partial copy shows at once.
IMAGENET100_COUNTS = {"train": 126_689, "val": 5_000}


def make_encoder(autoencoder: Autoencoder):
    """images uint8 (n, R, R, 3) -> (mean, std) of shape (n, 2, h, w, c): [:, 0] as is, [:, 1] flipped.

    Batches are split over this process's devices; n must be a multiple of their number.
    """
    mesh = data_mesh(jax.local_devices())
    sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    weights = jax.device_put(autoencoder.weights, NamedSharding(mesh, PartitionSpec()))

    @jax.jit
    def encode(weights, images):
        x = from_uint8(images)
        both = jnp.concatenate([x, x[:, :, ::-1]])  # the flip of DiT's training augmentation
        mean, logvar = autoencoder.encode_with(weights, both)
        std = jnp.exp(0.5 * logvar)
        n = images.shape[0]
        return (jnp.stack([mean[:n], mean[n:]], axis=1), jnp.stack([std[:n], std[n:]], axis=1))

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = encode(weights, jax.device_put(images, sharded))
        return np.asarray(mean), np.asarray(std)

    return run


def _files_digest(image_set: ImageSet) -> str:
    digest = hashlib.sha256()
    for path, label in image_set.files:
        digest.update(f"{path.relative_to(image_set.root)}\t{label}\n".encode())
    return digest.hexdigest()


def extract(data: str | Path, autoencoder: Autoencoder, out: str | Path, *, resolution: int = 256,
            split: str = "train", batch_size: int = 64, shard_size: int = 1024, dtype: str = "float16",
            name: str | None = None, progress: bool = True,
            repa_encoder=None) -> dict | None:
    """Builds (or completes) the cache in `out`; returns its manifest, or None while other processes'
    shards are still missing. `name` is the dataset's name in results (default: imagenet100 for the
    Kaggle layout, else the root folder's name). With a `repa_encoder` (`dit.repa.load_dinov2`) each
    record also stores REPA's targets, the encoder's features of the unflipped image."""
    check_sizes({"--resolution": (resolution, 256), "--batch": (batch_size, 64), "--shard-size": (shard_size, 1024)})
    image_set = find_images(data, split)
    out = Path(out)
    expected = IMAGENET100_COUNTS.get(split) if image_set.layout == "imagenet100" else None
    print(f"found {len(image_set):,} {split} images in {len(image_set.classes)} classes under {image_set.root}"
          + (f" (the full ImageNet-100 has {expected:,})" if expected else ""))
    devices = jax.local_device_count()
    batch_size = max(devices, batch_size // devices * devices)
    down = autoencoder.downsample
    if resolution % down:
        raise UserError(f"--resolution {resolution} is not a multiple of the autoencoder's downsampling {down}.")
    settings = {
        "dataset": name or ("imagenet100" if image_set.layout == "imagenet100" else image_set.root.name),
        "data": str(image_set.root), "split": split, "layout": image_set.layout, "resolution": resolution,
        "autoencoder": {"source": autoencoder.source, "sha256": autoencoder.sha256},
        "scale_factor": float(autoencoder.scale_factor),
        "dtype": dtype, "shard_size": shard_size, "num_files": len(image_set), "files_sha256": _files_digest(image_set),
        "repa": {"source": repa_encoder.source, "sha256": repa_encoder.sha256} if repa_encoder else None,
    }
    if repa_encoder is not None and repa_encoder.resolution != resolution:
        raise UserError(f"--resolution {resolution} differs from the REPA encoder's {repa_encoder.resolution}; "
                        f"load the encoder at the crop's resolution.")
    ranges = latent_cache.shard_ranges(len(image_set), shard_size)
    with _disk_full_is_a_user_error(out, len(ranges)):
        _check_settings(out, settings)

    owned = {k for k in range(len(ranges)) if k % jax.process_count() == jax.process_index()}
    latent_cache.remove_partial_shards(out, owned)
    todo = sorted(owned - latent_cache.finished_shards(out))
    if len(todo) < len(owned):
        print(f"resuming: {len(owned) - len(todo)} of this process's {len(owned)} shards are already done")
    encode = make_encoder(autoencoder)
    images_todo = sum(ranges[k][1] - ranges[k][0] for k in todo)
    bar = tqdm(total=images_todo, disable=not progress, desc="encode", unit="img")
    start, done = time.perf_counter(), 0
    latent_shape = None
    with ThreadPoolExecutor(1) as reader, bar:  # reads the next batch from disk while this one encodes
        for k in todo:
            batches = [np.arange(s, min(s + batch_size, ranges[k][1])) for s in range(*ranges[k], batch_size)]
            pending = reader.submit(load_images, image_set, batches[0], resolution)
            means, stds, labels, indices, skipped, targets = [], [], [], [], [], []
            for i in range(len(batches)):
                images, good, bad = pending.result()
                if i + 1 < len(batches):
                    pending = reader.submit(load_images, image_set, batches[i + 1], resolution)
                skipped += [(str(path), reason) for path, reason in bad]
                if len(good):
                    padded = -len(good) % devices  # the last batch pads up to the device count
                    full = np.concatenate([images, np.repeat(images[-1:], padded, 0)])
                    mean, std = encode(full)
                    if repa_encoder is not None:
                        targets.append(int8_directions(repa_encoder.features(full))[:len(good)])
                    means.append(mean[:len(good)].astype(dtype))
                    stds.append(std[:len(good)].astype(dtype))
                    labels.append(np.asarray([image_set.files[j][1] for j in good], np.int32))
                    indices.append(np.asarray(good, np.int64))
                    latent_shape = means[-1].shape[2:]
                done += len(batches[i])
                bar.update(len(batches[i]))
                bar.set_postfix(img_s=f"{done / (time.perf_counter() - start):.1f}")
            if not means:  # a shard of nothing but bad files still records them
                latent_shape = latent_shape or _latent_shape(encode, resolution, devices)
                means = stds = [np.zeros((0, 2, *latent_shape), dtype)]
                labels, indices = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
            with _disk_full_is_a_user_error(out, len(ranges)):
                latent_cache.write_shard(out, k, latent_cache.Shard(
                    np.concatenate(means), np.concatenate(stds), np.concatenate(labels), np.concatenate(indices), skipped,
                    repa=_repa_rows(targets, repa_encoder)))
    elapsed = time.perf_counter() - start
    if done:
        print(f"encoded {done:,} images (x2 with flips) in {elapsed:.1f} s: {done / elapsed:.1f} img/s")

    if len(latent_cache.finished_shards(out)) < len(ranges):
        print(f"this process's shards are done; {out / latent_cache.MANIFEST} is written by the last process to finish")
        return None
    with _disk_full_is_a_user_error(out, len(ranges)):
        manifest = latent_cache.build_manifest(
            out, {**settings, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            list(image_set.classes), dict(image_set.names),
            tuple(latent_shape or _latent_shape(encode, resolution, devices)), len(ranges))
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} files that could not be read (listed in manifest.json):")
        for item in manifest["skipped"]:
            print(f"  {item['path']}: {item['reason']}")
    print(f"cache complete: {manifest['count']:,} images x 2 flips in {out}")
    return manifest


def _repa_rows(targets: list[np.ndarray], repa_encoder) -> np.ndarray | None:
    if repa_encoder is None:
        return None
    return np.concatenate(targets) if targets else np.zeros((0, *repa_encoder.feature_shape), np.int8)


@contextmanager
def _disk_full_is_a_user_error(out: Path, num_shards: int):
    """A full disk while writing. Shards and manifest are renamed into place whole and a failed write removes
    its temporary copy, so what is on disk stays consistent and rerunning resumes."""
    try:
        yield
    except OSError as error:
        if not is_disk_full(error):
            raise
        done = len(latent_cache.finished_shards(out)) if out.is_dir() else 0
        raise UserError(
            f"the disk is full: writing the latent cache in {out} failed ({error.strerror}). {done} of its "
            f"{num_shards} shards are finished and kept; nothing half-written is left, and the cache is not "
            f"marked complete. Free space on the disk that holds {out}, then run the same command again: it "
            f"resumes from the finished shards.") from None


def _latent_shape(encode, resolution: int, devices: int) -> tuple[int, ...]:
    mean, _ = encode(np.zeros((devices, resolution, resolution, 3), np.uint8))
    return tuple(mean.shape[2:])


def _check_settings(out: Path, settings: dict) -> None:
    """A cache is finished with the settings it was started with; anything else is an error."""
    path = out / latent_cache.SETTINGS
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            listed = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise UserError(
                f"{out} holds a latent cache started with other settings ({listed}). Finish it with the "
                f"same settings, or choose a new --out directory; nothing was changed."
            )
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; the cache is a directory of shards. Choose a new directory path.")
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise UserError(f"--out {out} exists and is not a latent cache; choose a new or empty directory.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as error:
        raise UserError(f"cannot create the --out directory {out} ({error.strerror}); choose a path that is "
                        f"not under a file, in a folder you can write.") from None
    latent_cache.write_json_atomic(path, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.data.extract", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset root (Kaggle ImageNet-100 layout or class folders)")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                        help="SD-VAE safetensors path or Hugging Face repo id; 'pixels' for no autoencoder")
    parser.add_argument("--out", required=True, help="cache directory (new, or an unfinished cache to complete)")
    parser.add_argument("--resolution", type=int, default=256, help="center-crop size (256 or 512)")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--name", help="the dataset's name in results (default: imagenet100 for the Kaggle "
                                       "layout, else the root folder's name)")
    parser.add_argument("--batch", type=int, default=64, help="images per encode batch on this process")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard (the unit of resume)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="storage dtype")
    parser.add_argument("--vae-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of the VAE's convolutions")
    parser.add_argument("--repa-encoder", help="facebook/dinov2-base model.safetensors (or its folder): also store "
                                               "REPA's targets, int8, 196 KB an image at 256 (train.repa_weight)")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-process extraction")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    try:
        check_sizes({"--resolution": (args.resolution, 256), "--batch": (args.batch, 64),
                     "--shard-size": (args.shard_size, 1024)})
        from dit.distributed import initialize
        initialize(args.coordinator, args.num_processes, args.process_id)
        repa_encoder = None
        if args.repa_encoder:
            from dit.repa import load_dinov2
            repa_encoder = load_dinov2(args.repa_encoder, resolution=args.resolution)
        autoencoder = load_autoencoder(args.vae, dtype=args.vae_dtype)
        extract(args.data, autoencoder, args.out, resolution=args.resolution, split=args.split,
                batch_size=args.batch, shard_size=args.shard_size, dtype=args.dtype, name=args.name,
                repa_encoder=repa_encoder)
    except UserError as error:
        return report(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
