"""Checkpoints of the whole training state with orbax: async saves, keep the last N plus every K-th.

A checkpoint holds the train state (parameters, EMA, optimizer state, step, RNG, loss scale) and, as
JSON, the data iterator state and the run config, so a resumed run continues at the exact next batch.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from dit.config import TrainConfig
from dit.mesh import to_host


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, directory: Path, cfg: TrainConfig):
        directory = Path(directory).absolute()
        self.local = cfg.local_checkpoints and jax.process_count() > 1
        if self.local:
            # No shared filesystem: every process writes its own copy of the (replicated) state, as host
            # arrays, to its own directory, without waiting for the others.
            directory = directory / f"process_{jax.process_index()}"
            multiprocessing = ocp.options.MultiprocessingOptions(
                primary_host=None, active_processes={jax.process_index()},
                barrier_sync_key_prefix=f"process_{jax.process_index()}")
        else:
            multiprocessing = ocp.options.MultiprocessingOptions()
        handlers = {"state": ocp.StandardCheckpointHandler(multiprocessing_options=multiprocessing),
                    "meta": ocp.JsonCheckpointHandler(multiprocessing_options=multiprocessing)}
        policies = [checkpoint_managers.LatestN(cfg.keep_checkpoints)]
        if cfg.keep_every:
            policies.append(checkpoint_managers.EveryNSteps(cfg.keep_every))
        if self.local:
            directory.mkdir(parents=True, exist_ok=True)  # orbax leaves this to us with active_processes
        options = ocp.CheckpointManagerOptions(
            create=not self.local,
            # Per-process (active_processes) async saves race their own directory creation in orbax
            # 0.12 (seen here: a missing tmp directory, about one run in three), so they are synchronous.
            enable_async_checkpointing=not self.local,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            multiprocessing_options=multiprocessing,
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an async save; the training loop goes on while it is written."""
        if self.local:
            state = to_host(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state):
        """The state (shaped and sharded like `abstract_state`) and the metadata saved at `step`."""
        target = abstract_state
        if self.local:
            target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state = restored.state
        if self.local:  # every process holds the same values: make them one replicated global array
            state = jax.tree.map(lambda a, like: jax.device_put(a, like.sharding), state, abstract_state)
        return state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
