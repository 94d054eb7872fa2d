"""The training input boundary: a source of per-process batches whose iterator state can be saved.

Any source with `next() -> (x, y)` (this process's rows, numpy) and `get_state()` / `set_state(dict)`
plugs into the training loop; the grain pipeline over the latent cache is one, `ArrayBatches` (in
memory, for tests and toy data) another.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BatchSource(Protocol):
    def next(self) -> tuple[np.ndarray, np.ndarray]: ...
    def get_state(self) -> dict: ...
    def set_state(self, state: dict) -> None: ...


class ArrayBatches:
    """Shuffled batches of in-memory arrays: every epoch a new permutation from (seed, epoch).

    The global batch is the same whatever the number of processes; process p takes its slice of it,
    so 1 process and N processes see the same data. The last partial batch of an epoch is dropped.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if len(x) < global_batch:
            raise ValueError(f"the dataset has {len(x)} examples, fewer than one batch of {global_batch}.")
        self.x, self.y = x, y
        self.global_batch, self.seed = global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position + self.global_batch > len(self.x):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        rows = self._order[self.position + self.offset: self.position + self.offset + self.local]
        self.position += self.global_batch
        return self.x[rows], self.y[rows]

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()
