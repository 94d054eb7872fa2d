"""The training input pipeline: batches read from the latent cache (or images encoded on the fly).

The order is a pure function of (seed, batch number): epoch e visits the records in the permutation
drawn from (seed, e); global batch b takes the next `global_batch` of them, and process p reads its
slice of that batch. So every record is read once per epoch across all processes, one process and
N processes train on the same global batches, and the iterator state is just the number of batches
handed out: a resumed run continues at the exact next batch.

A cache batch is one gather per shard from the memory-mapped arrays: the records' means and stds, both
flips, with their (epoch, record) ids. The flip and the posterior sample are drawn on the device, in
the training step, from (seed, epoch, record) (`dit.batches.latents_from_batch`), so no two epochs see
the same latent. No per-record work is left on the host, so the cache path needs no worker processes:
a thread reading ahead (`dit.batches.Prefetch`) keeps up. The image path decodes one file at a time,
so grain runs it (worker processes, prefetching, batching).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dit.autoencoder import Autoencoder, from_uint8
from dit.batches import Batch, BatchFormat, EpochOrder
from dit.data.cache import LatentCache
from dit.errors import UserError

STREAM_LENGTH = 2**40  # batches are indexed lazily; no run reads this far


def _batch_ids(epoch: int, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.full(len(records), epoch, np.int32), np.asarray(records, np.int32)


class CacheBatches:
    """This process's training batches from a latent cache, read a whole batch at a time: both flips of
    each record (only the unflipped one with `flip=False`); state = batches handed out."""

    def __init__(self, cache: LatentCache | str | Path, global_batch: int, seed: int, *,
                 process_index: int | None = None, process_count: int | None = None, flip: bool = True,
                 repa: bool = False):
        cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        self.cache, self.flip, self.repa = cache, flip, repa
        self.order = EpochOrder(len(cache), global_batch, seed, process_index, process_count)
        repa_shape = cache.repa_shape if repa else ()  # a cache without targets: a clear error
        self.batch_format = BatchFormat(dtype=cache.dtype.name, flip=flip, scale_factor=cache.scale_factor,
                                        repa_shape=repa_shape)
        self.batches = 0

    def next(self) -> Batch:
        epoch, records = self.order.batch(self.batches)
        mean, std, label = self.cache.read(records, flips=2 if self.flip else 1)
        targets = self.cache.read_repa(records) if self.repa else None
        self.batches += 1
        return Batch(mean, std, label, *_batch_ids(epoch, records), repa=targets)

    def get_state(self) -> dict:
        return {"batches": self.batches}

    def set_state(self, state: dict) -> None:
        self.batches = int(state["batches"])


class _ReadImage:
    """Stream element -> (uint8 image, flipped at random if `flip`, label); a file that cannot be read is
    replaced by the next readable record of the same epoch, with a warning."""

    def __init__(self, image_set, resolution: int, order: EpochOrder, flip: bool):
        self.image_set, self.resolution, self.order, self.flip = image_set, resolution, order, flip

    def __call__(self, local_index: int) -> tuple[np.ndarray, np.int32]:
        from dit.data.images import BadImage, load_image
        epoch, record = self.order(local_index)
        rng = np.random.default_rng([self.order.seed, epoch, record])
        for attempt in range(len(self.image_set)):
            path, label = self.image_set.files[(record + attempt) % len(self.image_set)]
            try:
                image = load_image(path, self.resolution)
                break
            except BadImage as error:
                warnings.warn(f"skipping {path}: {error}")
        else:
            raise UserError(f"no image under {self.image_set.root} could be read.")
        return (image[:, ::-1] if rng.integers(2) and self.flip else image), np.int32(label)


class ImageBatches:
    """The on-the-fly path, for users without a cache: images -> autoencoder -> the posterior's mean and
    std, one flip per record chosen here (the step samples it and scales it by the autoencoder's scale
    factor, as for a cache).

    grain reads the files (`workers` processes); encoding runs on this process's devices each batch, so
    it costs far more than reading a cache. State = batches handed out.
    """

    def __init__(self, data: str | Path, autoencoder: Autoencoder, resolution: int, global_batch: int,
                 seed: int, *, process_index: int | None = None, process_count: int | None = None,
                 workers: int = 0, flip: bool = True):
        from dit.data.images import find_images
        from dit.mesh import BATCH_AXIS, data_mesh
        self.image_set = find_images(data, "train")
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        self.order = EpochOrder(len(self.image_set), global_batch, seed, process_index, process_count)
        self.read = _ReadImage(self.image_set, resolution, self.order, flip)
        self.workers, self.batches, self._iterator = workers, 0, None
        self.num_classes = len(self.image_set.classes)
        self.batch_format = BatchFormat(dtype="float32", flip=False, scale_factor=autoencoder.scale_factor)
        devices = jax.local_device_count()
        if self.order.local % devices:
            raise UserError(f"this process's batch {self.order.local} does not split over its {devices} devices.")
        mesh = data_mesh(jax.local_devices())
        sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        weights = jax.device_put(autoencoder.weights, NamedSharding(mesh, PartitionSpec()))

        @jax.jit
        def encode(weights, images):
            mean, logvar = autoencoder.encode_with(weights, from_uint8(images))
            return mean[:, None], jnp.exp(0.5 * logvar)[:, None]  # axis 1: the one flip chosen

        self._encode = lambda images: [np.asarray(a) for a in encode(weights, jax.device_put(images, sharded))]

    def _start(self):
        import grain  # imported here so that the training core runs where grain is not installed
        dataset = (grain.MapDataset.range(self.batches * self.order.local, STREAM_LENGTH)
                   .map(self.read).batch(self.order.local, drop_remainder=True))
        iterable = dataset.to_iter_dataset()
        if self.workers > 0:
            from absl import flags
            if not flags.FLAGS.is_parsed():
                # grain <= 0.2.18 reads an absl flag in its workers that only absl.app parses
                # (google/grain#1355); with no absl.app here, the flags keep their defaults.
                flags.FLAGS.mark_as_parsed()
            iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(iterable)

    def next(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._start()
        images, labels = next(self._iterator)
        mean, std = self._encode(images)
        epoch, records = self.order.batch(self.batches)
        self.batches += 1
        return Batch(mean, std, labels, *_batch_ids(epoch, records))

    def get_state(self) -> dict:
        return {"batches": self.batches}

    def set_state(self, state: dict) -> None:
        self.batches, self._iterator = int(state["batches"]), None
