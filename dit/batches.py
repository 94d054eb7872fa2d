"""The training input boundary: the batch the training step takes, and sources of them whose state can be saved.

A batch holds, per record of this process's rows, the posterior's mean and std (axis 1: the unflipped
and the flipped image, or just one) with the label and the (epoch, record) ids; the step draws the flip
and the posterior sample on the device from those ids (`latents_from_batch`). Any source with
`next() -> Batch` (numpy), `get_state()` / `set_state(dict)` and a `batch_format` plugs into the
training loop: the latent cache (`dit.data.pipeline.CacheBatches`) is one, `ArrayBatches` (latents in
memory, for tests and toy data) another. `Prefetch` reads a source ahead in a thread and puts its
batches on the devices.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from dit.errors import UserError

# Stream 1 of PRNGKey(train.seed) is the training state's key (dit.train.init_state); the data's is 2.
DATA_STREAM = 2


class Batch(NamedTuple):
    """One batch, rows = records; a pytree, so it is sharded, put on devices and described leaf by leaf."""

    mean: np.ndarray  # (B, 2, h, w, c): the unflipped and the flipped image; (B, 1, h, w, c): the one to use
    std: np.ndarray  # the same shape: the posterior's standard deviation (0: the latent is the mean)
    label: np.ndarray  # (B,) int32
    epoch: np.ndarray  # (B,) int32: with `record`, all the randomness of the record's latent
    record: np.ndarray  # (B,) int32
    repa: np.ndarray | None = None  # (B, tokens, dim) int8: REPA's targets, where the run aligns with them


@dataclass(frozen=True)
class BatchFormat:
    """What a source's batches hold besides the model's latent shape: the training step is compiled for it."""

    dtype: str = "float32"  # of mean and std, as stored
    flip: bool = False  # True: axis 1 holds both images and the step picks one at random per record
    scale_factor: float = 1.0  # applied to the sample on the device (the cache's SD-VAE factor, say)
    repa_shape: tuple[int, ...] = ()  # (tokens, dim) of the batches' REPA targets; () for none


def latent_batch(x: np.ndarray, y: np.ndarray) -> Batch:
    """Latents already drawn, as a batch: std 0, so the step's noise leaves them as they are."""
    x = np.asarray(x, np.float32)  # ArrayBatches' batch_format
    ids = np.zeros(len(x), np.int32)  # no randomness to draw: any ids give the same latents
    return Batch(x[:, None], np.zeros_like(x[:, None]), np.asarray(y, np.int32), ids, ids)


def latents_from_batch(batch: Batch, seed: int, scale_factor: float) -> tuple[jax.Array, jax.Array]:
    """Batch -> (x float32 (B, h, w, c), y): per record the flipped or unflipped image (at random where the
    batch holds both) and a fresh sample of its posterior, times `scale_factor`.

    Record r of epoch e draws from fold_in(fold_in(fold_in(PRNGKey(seed), DATA_STREAM), e), r), split into
    a flip key and a noise key: the latent is a pure function of (seed, e, r), wherever the record sits in
    the batch and however many processes read it, and the noise is the same with flips on or off.
    """
    stream = jax.random.fold_in(jax.random.PRNGKey(seed), DATA_STREAM)

    def sample(mean, std, epoch, record):
        flip_key, noise_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(stream, epoch), record))
        pick = jax.random.bernoulli(flip_key) if mean.shape[0] == 2 else False
        mean, std = (jnp.where(pick, a[-1], a[0]).astype(jnp.float32) for a in (mean, std))
        return (mean + std * jax.random.normal(noise_key, mean.shape)) * scale_factor

    return jax.vmap(sample)(batch.mean, batch.std, batch.epoch, batch.record), batch.label


class BatchSource(Protocol):
    batch_format: BatchFormat

    def next(self) -> Batch: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


class EpochOrder:
    """Which records process p reads in its share of global batch b."""

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

    def batch(self, b: int) -> tuple[int, np.ndarray]:
        """(epoch, records) of this process's rows of global batch b."""
        epoch, k = divmod(int(b), self.batches_per_epoch)
        start = k * self.global_batch + self.offset
        return epoch, self.permutation(epoch)[start:start + self.local]

    def __call__(self, local_index: int) -> tuple[int, int]:
        """(epoch, record) of element `local_index` of this process's stream."""
        b, r = divmod(int(local_index), self.local)
        epoch, records = self.batch(b)
        return epoch, int(records[r])


class ArrayBatches:
    """Shuffled batches of in-memory latents, in the cache's epoch order (`EpochOrder`): 1 process and N see
    the same global batches; the last partial batch of an epoch is dropped."""

    batch_format = BatchFormat()

    def __init__(self, x: np.ndarray, y: np.ndarray, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.x, self.y = x, y
        self.order = EpochOrder(len(x), global_batch, seed, process_index, process_count)
        self.batches = 0

    def next(self) -> Batch:
        _, rows = self.order.batch(self.batches)
        self.batches += 1
        return latent_batch(self.x[rows], self.y[rows])

    def get_state(self) -> dict:
        # As (epoch, position in it), the form checkpoints of earlier runs hold.
        epoch, k = divmod(self.batches, self.order.batches_per_epoch)
        return {"epoch": epoch, "position": k * self.order.global_batch}

    def set_state(self, state: dict) -> None:
        self.batches = (int(state["epoch"]) * self.order.batches_per_epoch
                        + int(state["position"]) // self.order.global_batch)


class Prefetch:
    """The next `count` batches of `source`, each passed through `put` (onto the devices) by a background
    thread up to `depth` ahead of the consumer, so reading and the transfer overlap the training step.

    `get_state()` is the source's state after the last batch handed out, not after the ones read ahead:
    what a checkpoint must hold. An error in the thread is raised by the `next()` that would have returned
    that batch. Use it as a context manager: leaving stops the thread.
    """

    def __init__(self, source: BatchSource, put: Callable, count: int, depth: int = 2):
        self._state, self._left = source.get_state(), count
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(source, put, count), daemon=True,
                                        name="prefetch")

    def __enter__(self) -> Prefetch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _read(self, source: BatchSource, put: Callable, count: int) -> None:
        try:
            for _ in range(count):
                if not self._offer((put(source.next()), source.get_state(), None)):
                    return
        except BaseException as error:  # KeyboardInterrupt too: the consumer decides what it means
            self._offer((None, None, error))

    def _offer(self, item) -> bool:
        """Queues `item` unless the consumer has left; False once it has."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def next(self):
        if not self._left:
            raise RuntimeError("Prefetch: all `count` batches were handed out")
        batch, state, error = self._queue.get()
        if error is not None:
            self._queue.put((None, None, error))  # the thread has ended: every later next() raises it too
            raise error
        self._state, self._left = state, self._left - 1
        return batch

    def get_state(self) -> dict:
        return self._state
