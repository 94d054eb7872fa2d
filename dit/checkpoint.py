"""Checkpoints of the whole training state with orbax: async saves, keep the last N plus every K-th.

A checkpoint holds the train state (parameters, EMA, optimizer state, step, RNG, loss scale) and, as
JSON, the data iterator state and the run config, so a resumed run continues at the exact next batch.

Each finished checkpoint is sealed: the SHA-256 of every file in it goes into its `sha256.json`. A
restore checks the seal, so a truncated, deleted or bit-flipped file is found before it loads (flipped
bytes in an array would otherwise load silently and surface as a NaN much later), and falls back to
the newest intact checkpoint. Damaged checkpoints are never deleted: training moves them aside.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from dit.config import TrainConfig
from dit.files import sha256_of, write_json_atomic
from dit.mesh import to_host

SEAL = "sha256.json"


class Checkpoints:
    """The checkpoints of one run directory. With `part`, for reading a part of the state (the EMA for an
    evaluation): restores take a subtree of the saved state, and nothing is saved."""

    def __init__(self, directory: Path, cfg: TrainConfig, part: bool = False):
        directory = Path(directory).absolute()
        self.local = cfg.local_checkpoints and jax.process_count() > 1
        if self.local:
            # No shared filesystem: every process writes its own copy of the whole state (the parts split
            # over devices gathered first), as host arrays, to its own directory.
            directory = directory / f"process_{jax.process_index()}"
            multiprocessing = ocp.options.MultiprocessingOptions(
                primary_host=None, active_processes={jax.process_index()},
                barrier_sync_key_prefix=f"process_{jax.process_index()}")
        else:
            multiprocessing = ocp.options.MultiprocessingOptions()
        self.part = part
        reader = ocp.PyTreeCheckpointHandler if part else ocp.StandardCheckpointHandler  # the same files
        handlers = {"state": reader(multiprocessing_options=multiprocessing),
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
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
        # The steps saved by this session and not sealed yet; one process seals a shared directory.
        self.sealer = self.local or jax.process_index() == 0
        self.unsealed: list[int] = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an async save; the training loop goes on while it is written."""
        self.seal_finished()
        if self.local:
            state = to_host(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        if self.sealer:
            self.unsealed.append(step)
        self.seal_finished()

    def seal_finished(self) -> None:
        """Seals the checkpoints whose async save has finished (cheap to call often: it checks a flag)."""
        if not self.unsealed or self.manager.is_saving_in_progress():
            return
        kept = set(self.manager.all_steps())
        for step in self.unsealed:
            folder = self.directory / str(step)
            if step in kept and folder.is_dir():
                files = {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*"))
                         if p.is_file() and p.name != SEAL}
                write_json_atomic(folder / SEAL, files)
        self.unsealed = []

    def damage(self, step: int) -> str | None:
        """What is wrong with the files of checkpoint `step` by its seal, or None when they match (or when
        it was never sealed: a run killed just after the save; the restore itself then checks it)."""
        folder = self.directory / str(step)
        try:
            seal = json.loads((folder / SEAL).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return f"its {SEAL} is unreadable"
        for name, digest in seal.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256_of(path) != digest:
                return f"{name} differs from the checksum written when it was saved"
        return None

    def restore_newest_intact(self, abstract_state, newest: int | None = None, agree=lambda step: step):
        """(step, state, meta, skipped) of the newest checkpoint (at most `newest`) that passes its seal and
        restores; skipped lists (step, what is wrong) for the newer ones; step is None when none is intact.
        `agree(step) -> step` runs before each restore: with several processes, every process must
        restore the same step (restoring is collective), so it is where they agree or stop."""
        skipped = []
        while True:
            step = None
            for candidate in sorted((s for s in self.manager.all_steps() if newest is None or s <= newest),
                                    reverse=True):
                problem = self.damage(candidate)
                if problem is None:
                    step = candidate
                    break
                skipped.append((candidate, problem))
            step = agree(step)
            if step is None:
                return None, None, None, skipped
            try:
                state, meta = self.restore(step, abstract_state)
                return step, state, meta, skipped
            except Exception as error:  # orbax and JSON errors alike: an unsealed damaged checkpoint, skip it
                skipped.append((step, f"it does not restore ({type(error).__name__}: {str(error).strip()[:160]})"))
                newest = step - 1

    def set_aside(self, steps: list[int]) -> Path | None:
        """Moves damaged checkpoints out of orbax's directory, to `<run>/damaged_checkpoints/`: kept for a
        look, and out of the way of the same steps when training saves them again."""
        if not steps:
            return None
        aside = self.directory.parent / "damaged_checkpoints"
        if self.local:
            aside = self.directory.parent.parent / "damaged_checkpoints" / self.directory.name
        aside.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for step in steps:
            shutil.move(str(self.directory / str(step)), str(aside / f"{step}-{stamp}"))
        self.manager.reload()
        return aside

    def restore(self, step: int, abstract_state):
        """The state (shaped and sharded like `abstract_state`) and the metadata saved at `step`."""
        target = abstract_state
        if self.local:
            target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_state)
        if self.part:
            state = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                           partial_restore=True)
        else:
            state = ocp.args.StandardRestore(target)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonRestore()))
        state = restored.state
        if self.local:  # every process holds the same values: make them global arrays placed as the target
            state = jax.tree.map(lambda a, like: jax.device_put(a, like.sharding), state, abstract_state)
        return state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self.seal_finished()

    def close(self) -> None:
        self.manager.close()
