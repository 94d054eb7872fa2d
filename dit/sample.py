"""Class-balanced sampling with the EMA parameters, sharded over all devices, deterministic for a seed.

Writes what evaluators need: a PNG grid for people and an ADM-style `.npz` (`arr_0`, uint8 NHWC) for
external FID tools. Latents become images through the run's autoencoder (`dit.autoencoder`: the pixel
identity for pixel-space data, the SD-VAE for latents).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm.auto import tqdm

from dit.autoencoder import Autoencoder, PixelAutoencoder, decode_scaled, to_uint8
from dit.config import SAMPLERS, EvalConfig, ModelConfig, RunConfig, TrainConfig
from dit.errors import UserError
from dit.guidance import guided_model_fn
from dit.mesh import batch_sharded, data_mesh, replicated
from dit.objectives import make_objective


# Rows a device decodes at once. The SD-VAE decoder at 256x256 keeps about 0.17 GB per image (TPU v3:
# 5.6 GB a core for 32), so a whole evaluation batch on one device (64 rows: about 11 GB) would not fit a
# 10 GB GPU slice that trains the in100 step; 8 rows a device at a time need about 1.5 GB.
DECODE_ROWS_PER_DEVICE = 8


def decode_in_chunks(decode: Callable, weights, latents: jax.Array, devices: int) -> jax.Array:
    """uint8 images of a batch of latents sharded by rows over `devices`, decoded a few rows a device at a
    time (DECODE_ROWS_PER_DEVICE): lax.map over chunks that each take the same rows of every device's
    share, so no row moves between devices and the memory is one chunk's."""
    n, per_device = latents.shape[0], latents.shape[0] // devices
    rows = max(r for r in range(1, min(DECODE_ROWS_PER_DEVICE, per_device) + 1) if per_device % r == 0)
    chunks = latents.reshape(devices, per_device // rows, rows, *latents.shape[1:]).swapaxes(0, 1)
    images = jax.lax.map(lambda chunk: to_uint8(decode(weights, chunk.reshape(-1, *chunk.shape[2:]))), chunks)
    images = images.reshape(per_device // rows, devices, rows, *images.shape[2:]).swapaxes(0, 1)
    return images.reshape(n, *images.shape[3:])


def sampler_name(train_cfg: TrainConfig, eval_cfg: EvalConfig) -> str:
    """eval.sampler, or the objective's default when it is "": ddpm for DDPM, SiT's sde for flow."""
    return eval_cfg.sampler or SAMPLERS[train_cfg.objective][0]


def make_sampler(model_cfg: ModelConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig) -> Callable:
    """sampler(model_fn, noise, key, y, cfg_scale=eval.cfg_scale) -> samples: the objective's sampling loop
    that the eval settings name, with classifier-free guidance over their interval (cfg_scale may be traced)."""
    # RunConfig checks the sampler against the objective, as for a run; callers such as dit.bench pass sections.
    objective = make_objective(RunConfig(model=model_cfg, train=train_cfg, eval=eval_cfg))
    loop, to_model_time = objective.sampling(eval_cfg)
    low, high = sorted((to_model_time(eval_cfg.guidance_low), to_model_time(eval_cfg.guidance_high)))
    interval = None if (eval_cfg.guidance_low, eval_cfg.guidance_high) == (0.0, 1.0) else (low, high)
    channels = eval_cfg.guided_channels or model_cfg.in_channels

    def sampler(model_fn, noise, key, y, cfg_scale=eval_cfg.cfg_scale):
        fn = guided_model_fn(model_fn, cfg_scale, model_cfg.num_classes, channels, interval)
        return loop(lambda x, t: fn(x, t, y), noise, key)

    return sampler


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """num_samples labels cycling through the classes: every class gets the same count (+-1)."""
    return np.arange(num_samples) % num_classes


GUIDED = 2.0  # _program_settings' stand-in for every guidance scale other than 1


def _program_settings(eval_cfg: EvalConfig) -> EvalConfig:
    """The eval settings as far as they shape the sampling program: a guidance scale other than 1 is an
    argument of the program (a sweep over scales compiles once), so only whether there is guidance is kept."""
    return replace(eval_cfg, cfg_scale=1.0 if eval_cfg.cfg_scale == 1.0 else GUIDED)


@functools.lru_cache(maxsize=16)
def _batch_sampler(graphdef, model_cfg: ModelConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig,
                   decoder: Autoencoder, mesh) -> Callable:
    """The jitted (params, key, labels, cfg_scale) -> latents and (decoder weights, latents) -> uint8 images
    of one batch for `_program_settings(eval_cfg)`; cached, so evaluations during a run, and a sweep's
    scales, compile once. Two programs, so each can be timed."""
    sampler = make_sampler(model_cfg, train_cfg, eval_cfg)
    guided = eval_cfg.cfg_scale != 1.0
    decode = functools.partial(decode_scaled, decoder)
    shape = (eval_cfg.batch_size, model_cfg.input_size, model_cfg.input_size, model_cfg.in_channels)

    # Outputs stay sharded by rows, so each process can take its own rows (`local_rows`).
    @functools.partial(jax.jit, out_shardings=batch_sharded(mesh))
    def sample_batch(params, key, y, cfg_scale):
        model = nnx.merge(graphdef, params)
        key_noise, key_sampler = jax.random.split(key)
        noise = jax.lax.with_sharding_constraint(jax.random.normal(key_noise, shape), batch_sharded(mesh))
        return sampler(lambda x, t, y: model(x, t, y), noise, key_sampler, y, cfg_scale if guided else 1.0)

    @functools.partial(jax.jit, out_shardings=batch_sharded(mesh))
    def decode_batch(decoder_weights, latents):
        return decode_in_chunks(decode, decoder_weights, latents, mesh.devices.size)

    return sample_batch, decode_batch


@dataclass
class Samples:
    """This process's share of a sampling run: its rows of every batch, in sample order, and where each row
    sits in the whole run. On one process that is every sample (plus the padding of the last batch)."""

    images: np.ndarray  # uint8 (n, H, W, C)
    index: np.ndarray  # int (n,): position in the class-balanced order; >= total for padding rows
    total: int  # the number of samples asked for

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Per-row results of this share (the images, or features computed from them) -> those of all
        processes in sample order, padding dropped. Cheap to call with features: only they travel."""
        index = self.index
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            rows = multihost_utils.process_allgather(rows, tiled=True)
            index = multihost_utils.process_allgather(index, tiled=True)
        order = np.argsort(index, kind="stable")
        return np.asarray(rows)[order[index[order] < self.total]]


def local_rows(array: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """A batch-sharded global array -> (this process's rows, their row numbers), in row order."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].indices(array.shape[0])[0])
    rows = np.concatenate([np.asarray(shard.data) for shard in shards])
    index = np.concatenate([np.arange(*shard.index[0].indices(array.shape[0])) for shard in shards])
    return rows, index


def generate_shares(graphdef, params, model_cfg: ModelConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig, *,
                    seed: int, num_samples: int | None = None, decoder: Autoencoder | None = None,
                    progress: bool = True, timings: dict | None = None) -> Samples:
    """num_samples (default eval.num_samples) class-balanced uint8 images, deterministic for the seed whatever
    the device count: batch i uses key fold_in(seed, i). Every process gets only the rows its devices made,
    so an evaluation embeds each image once, where it was made, and gathers features, not images.

    With a `timings` dict, adds the seconds spent sampling and decoding to its "sample_s" and "decode_s"
    (waiting for each; without it, the device runs ahead of the host)."""
    num_samples = num_samples or eval_cfg.num_samples
    decoder = decoder or PixelAutoencoder()  # equal to every other: the compiled programs are shared
    mesh = data_mesh()
    batch = eval_cfg.batch_size
    if batch % jax.device_count():
        raise UserError(f"eval.batch_size={batch} does not split over {jax.device_count()} devices.")
    params = jax.device_put(params, replicated(mesh))
    sample_batch, decode_batch = _batch_sampler(graphdef, model_cfg, train_cfg, _program_settings(eval_cfg), decoder,
                                                mesh)
    cfg_scale = jnp.float32(eval_cfg.cfg_scale)
    decoder_weights = jax.device_put(decoder.weights, replicated(mesh))
    labels = balanced_labels(num_samples, model_cfg.num_classes)
    images, index = [], []
    for i in tqdm(range(math.ceil(num_samples / batch)), disable=not progress, desc="sample", unit="batch"):
        y = np.resize(labels[i * batch:(i + 1) * batch], batch)  # the last batch is padded, then cut
        y = jax.device_put(jnp.asarray(y), batch_sharded(mesh))
        started = time.perf_counter()
        latents = sample_batch(params, jax.random.fold_in(jax.random.PRNGKey(seed), i), y, cfg_scale)
        if timings is not None:
            jax.block_until_ready(latents)
            timings["sample_s"] = timings.get("sample_s", 0.0) + time.perf_counter() - started
            started = time.perf_counter()
        decoded = decode_batch(decoder_weights, latents)
        if timings is not None:
            jax.block_until_ready(decoded)
            timings["decode_s"] = timings.get("decode_s", 0.0) + time.perf_counter() - started
        rows, rows_index = local_rows(decoded)
        images.append(rows)
        index.append(i * batch + rows_index)
    return Samples(np.concatenate(images), np.concatenate(index), num_samples)


def generate(graphdef, params, model_cfg: ModelConfig, train_cfg: TrainConfig, eval_cfg: EvalConfig, *,
             seed: int, num_samples: int | None = None, decoder: Autoencoder | None = None,
             progress: bool = True, timings: dict | None = None) -> np.ndarray:
    """All num_samples images (N, H, W, C) on every process: `generate_shares`, gathered."""
    samples = generate_shares(graphdef, params, model_cfg, train_cfg, eval_cfg, seed=seed, num_samples=num_samples,
                              decoder=decoder, progress=progress, timings=timings)
    return samples.gather(samples.images)


def save_grid(images: np.ndarray, path: Path, columns: int | None = None) -> None:
    """uint8 (N, H, W, C) images as one PNG grid, `columns` wide (default about square), 2px gaps."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = image
    Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3]).save(path)


def save_npz(images: np.ndarray, path: Path) -> None:
    """The sample batch as ADM's evaluator reads it: `arr_0`, uint8 NHWC."""
    np.savez(path, arr_0=images)
