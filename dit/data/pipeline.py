"""The training input pipeline: grain over the latent cache (or over images, encoded on the fly).

The order is a pure function of (seed, batch number): epoch e visits the records in the permutation
drawn from (seed, e); global batch b takes the next `global_batch` of them, and process p reads its
slice of that batch. So every record is read once per epoch across all processes, one process and
N processes train on the same global batches, and the iterator state is just the number of batches
handed out: a resumed run continues at the exact next batch. Each read picks the flipped or unflipped
latent and draws a fresh posterior sample from (seed, epoch, record), so no two epochs see the same
latent. grain does the reading: worker processes, prefetching, batching.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dit.autoencoder import as_function
from dit.data.cache import LatentCache
from dit.errors import UserError

STREAM_LENGTH = 2**40  # batches are indexed lazily; no run reads this far


class EpochOrder:
    """Which record process p reads at row r of its share of global batch b."""

    def __init__(self, num_records: int, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch % process_count:
            raise UserError(f"the global batch {global_batch} does not split over {process_count} processes.")
        if num_records < global_batch:
            raise UserError(f"the dataset has {num_records} records, fewer than one global batch of "
                            f"{global_batch}; lower train.batch_size.")
        self.num_records, self.global_batch, self.seed = num_records, global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.batches_per_epoch = num_records // global_batch  # the last partial batch is dropped
        self._epoch, self._permutation = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # one permutation is kept: reads move through epochs in order
            self._epoch, self._permutation = epoch, np.random.default_rng([self.seed, epoch]).permutation(
                self.num_records)
        return self._permutation

    def __call__(self, local_index: int) -> tuple[int, int]:
        """(epoch, record) of element `local_index` of this process's stream."""
        b, r = divmod(int(local_index), self.local)
        epoch, k = divmod(b, self.batches_per_epoch)
        return epoch, int(self.permutation(epoch)[k * self.global_batch + self.offset + r])


class _ReadLatent:
    """Stream element -> (latent, label): a random flip (if `flip`) and a fresh sample of the posterior, scaled."""

    def __init__(self, cache: LatentCache, order: EpochOrder, flip: bool):
        self.cache, self.order, self.flip = cache, order, flip

    def __call__(self, local_index: int) -> tuple[np.ndarray, np.int32]:
        epoch, record = self.order(local_index)
        mean, std, label = self.cache.record(record)
        rng = np.random.default_rng([self.order.seed, epoch, record])
        flip = rng.integers(2) * self.flip  # drawn either way: the noise is the same with flips on or off
        noise = rng.standard_normal(mean.shape[1:], dtype=np.float32)
        latent = (mean[flip].astype(np.float32) + std[flip].astype(np.float32) * noise) * self.cache.scale_factor
        return latent, np.int32(label)


class _GrainBatches:
    """Batches of `element(local_index)` read by grain from batch `start` on; state = batches handed out."""

    def __init__(self, element, local_batch: int, workers: int):
        self.element, self.local_batch, self.workers = element, local_batch, workers
        self.batches = 0
        self._iterator = None

    def _start(self):
        import grain  # imported here so that the training core runs where grain is not installed
        dataset = (grain.MapDataset.range(self.batches * self.local_batch, STREAM_LENGTH)
                   .map(self.element).batch(self.local_batch, drop_remainder=True))
        iterable = dataset.to_iter_dataset()
        if self.workers > 0:
            from absl import flags
            if not flags.FLAGS.is_parsed():
                # grain <= 0.2.18 reads an absl flag in its workers that only absl.app parses
                # (google/grain#1355); with no absl.app here, the flags keep their defaults.
                flags.FLAGS.mark_as_parsed()
            iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(iterable)

    def next(self):
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self.batches += 1
        return batch

    def get_state(self) -> dict:
        return {"batches": self.batches}

    def set_state(self, state: dict) -> None:
        self.batches, self._iterator = int(state["batches"]), None


class CacheBatches(_GrainBatches):
    """This process's training batches (x float32 NHWC, y int32) from a latent cache."""

    def __init__(self, cache: LatentCache | str | Path, global_batch: int, seed: int, *,
                 process_index: int | None = None, process_count: int | None = None, workers: int = 0,
                 flip: bool = True):
        cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        self.cache = cache
        self.order = EpochOrder(len(cache), global_batch, seed, process_index, process_count)
        super().__init__(_ReadLatent(cache, self.order, flip), self.order.local, workers)


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


class ImageBatches(_GrainBatches):
    """The on-the-fly path, for users without a cache: images -> autoencoder -> scaled latents in the loop.

    Encoding runs on this process's devices each step, so it costs far more than reading a cache.
    """

    def __init__(self, data: str | Path, autoencoder, scale_factor: float, resolution: int, global_batch: int,
                 seed: int, *, process_index: int | None = None, process_count: int | None = None,
                 workers: int = 0, flip: bool = True):
        from dit.data.images import find_images
        from dit.mesh import BATCH_AXIS, data_mesh
        self.image_set = find_images(data, "train")
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        self.order = EpochOrder(len(self.image_set), global_batch, seed, process_index, process_count)
        super().__init__(_ReadImage(self.image_set, resolution, self.order, flip), self.order.local, workers)
        self.num_classes = len(self.image_set.classes)
        devices = jax.local_device_count()
        if self.order.local % devices:
            raise UserError(f"this process's batch {self.order.local} does not split over its {devices} devices.")
        mesh = data_mesh(jax.local_devices())
        sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        encode_fn, weights = as_function(autoencoder, "encode")
        weights = jax.device_put(weights, NamedSharding(mesh, PartitionSpec()))

        @jax.jit
        def encode(weights, images, key):
            mean, logvar = encode_fn(weights, images.astype(jnp.float32) / 127.5 - 1.0)
            std = jnp.exp(0.5 * logvar)
            return (mean + std * jax.random.normal(key, mean.shape)) * scale_factor

        self._encode = lambda images, key: np.asarray(encode(weights, jax.device_put(images, sharded), key))

    def next(self):
        images, labels = super().next()
        key = jax.random.fold_in(jax.random.PRNGKey(self.order.seed), self.batches)
        key = jax.random.fold_in(key, self.order.offset)  # processes encode different images
        return self._encode(images, key), labels
