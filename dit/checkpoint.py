"""Checkpoints of the whole training state with orbax: async saves, keep the last N plus every K-th.

A checkpoint holds the train state (parameters, EMA, optimizer state, step, RNG, loss scale) and, as
JSON, the data iterator state and the run config, so a resumed run continues at the exact next batch.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from dit.config import TrainConfig


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, directory: Path, cfg: TrainConfig):
        directory = Path(directory).absolute()
        if cfg.local_checkpoints and jax.process_count() > 1:
            # No shared filesystem: every process writes the whole (replicated) state to its own directory.
            directory = directory / f"process_{jax.process_index()}"
            multiprocessing = ocp.options.MultiprocessingOptions(
                primary_host=None, active_processes={jax.process_index()},
                barrier_sync_key_prefix=f"process_{jax.process_index()}")
        else:
            multiprocessing = ocp.options.MultiprocessingOptions()
        policies = [checkpoint_managers.LatestN(cfg.keep_checkpoints)]
        if cfg.keep_every:
            policies.append(checkpoint_managers.EveryNSteps(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            multiprocessing_options=multiprocessing,
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an async save; the training loop goes on while it is written."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state):
        """The state (shaped and sharded like `abstract_state`) and the metadata saved at `step`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
