"""A run directory's training and what is read back from it: the one place that starts, resumes and
reads a run, and the one that turns its evaluations into leaderboard rows.

`train_run` checks the directory, compiles the step (a step that does not fit fails here, before
anything is written), takes the directory's lock (process 0), writes config.json (the resolved config,
this run's model size, the compiled step's choices and the caller's `record`) and runs the training
loop (`dit.train.train`), which writes the checkpoints, metrics.jsonl and summary.json. `restore_ema`
reads the EMA parameters of a checkpoint, for evaluations after training; `record_results` appends the
evaluations of metrics.jsonl to the leaderboard.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx

from dit.batches import BatchSource
from dit.checkpoint import Checkpoints
from dit.config import RunConfig, to_dict
from dit.counting import count_params
from dit.errors import UserError
from dit.files import is_disk_full, write_json_atomic
from dit.leaderboard import append_rows, read_rows, run_row
from dit.mesh import data_mesh, local_batch_size, replicated
from dit.model import DiT
from dit.objectives import Objective
from dit.rundir import CONFIG, SUMMARY, RunLock, holds_run, read_json, read_metrics, record_resume_changes
from dit.train import build_training, train


class DiskFull(UserError):
    exit_code = 1


def train_run(run: RunConfig, workdir: Path, source: BatchSource, objective: Objective, *, resume: bool = False,
              record: dict | None = None, progress: bool = True,
              evaluate: Callable[[int, object], dict] | None = None, resume_changes: dict | None = None) -> dict:
    """Trains run.model with run.train from `source` in the run directory `workdir`; returns the summary
    also written to summary.json.

    Only process 0 writes the directory's files, holding its lock. `record` (the launcher's: run id,
    commit, budget count, ...) goes into config.json with the config; `resume_changes` ({"train.lr":
    [old, new]}: what a resume may change) too, from the step they take effect. A finished run (its
    summary.json) is never touched again: resuming it returns its summary.
    """
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    if resume and (finished := read_json(workdir / SUMMARY)) is not None:
        if run.train.steps > finished["final_step"]:
            raise UserError(f"--resume: {workdir} is complete at step {finished['final_step']}, and its summary and "
                            f"evaluations are final; a finished run is not extended. Start a new run with "
                            f"train.steps={run.train.steps}.")
        return finished
    if resume and not (workdir / CONFIG).is_file() and not (workdir / "checkpoints").is_dir():
        raise UserError(f"--resume: {workdir} holds no run (no config.json, no checkpoints) to resume; start it "
                        f"without --resume.")
    if not resume and holds_run(workdir):
        raise UserError(f"the run directory {workdir} already exists and is not empty; pass --resume to continue "
                        f"that run, or choose another --workdir. Nothing was changed.")
    local_batch_size(run.train.batch_size)  # fails early if the batch does not split over the devices
    # DoesNotFit: before anything is written
    _, state, compiled = build_training(run, objective, data_mesh(), source.batch_format)
    with contextlib.ExitStack() as held:
        if lead:
            held.enter_context(RunLock(workdir))
            if not resume and (workdir / CONFIG).is_file():  # started by another run.py while this one compiled
                raise UserError(f"the run directory {workdir} was started by another process a moment ago; pass "
                                f"--resume to continue that run, or choose another --workdir.")
            if not (workdir / CONFIG).is_file():
                memory = compiled.memory
                compiled_step = {"grad_accum": compiled.grad_accum, "memory_gb": memory.total / 1e9,
                                 "capacity_gb": None if memory.capacity is None else memory.capacity / 1e9}
                write_json_atomic(workdir / CONFIG, {**to_dict(run), "model_params": count_params(run.model),
                                                     "compiled_step": compiled_step, **(record or {})})
        on_resume = (lambda step: record_resume_changes(workdir, resume_changes, step)) if lead and resume_changes \
            else None
        try:
            return train(run, workdir, source, state, compiled, resume=resume, progress=progress,
                         evaluate=evaluate, on_resume=on_resume)
        except Exception as error:
            if not is_disk_full(error):
                raise
            raise DiskFull(
                f"the disk holding {workdir} is full ({error}). Every checkpoint that finished is intact; free some "
                f"space (or lower train.keep_checkpoints), then resume with `python ablations/run.py --resume "
                f"--workdir {workdir}`."
            ) from None


def checkpoint_steps(run_dir: Path, run: RunConfig, step: int | None) -> list[int]:
    """The run's finished checkpoint steps; UserError when there are none, or none at `step`."""
    checkpoints = Checkpoints(Path(run_dir) / "checkpoints", run.train, part=True)
    try:
        return _finished_steps(checkpoints, run_dir, step)
    finally:
        checkpoints.close()


def _finished_steps(checkpoints: Checkpoints, run_dir: Path, step: int | None) -> list[int]:
    steps = sorted(checkpoints.manager.all_steps())
    if not steps:
        raise UserError(f"{run_dir} holds no finished checkpoint to evaluate.")
    if step is not None and step not in steps:
        raise UserError(f"{run_dir} has no checkpoint at step {step}; it has {', '.join(map(str, steps))}.")
    return steps


def restore_ema(run_dir: Path, run: RunConfig, step: int | None) -> tuple[int, object, object]:
    """(step, graphdef, EMA parameters, replicated) of the checkpoint at `step` (default the newest intact
    one). Only the EMA is read: its shapes are the model's, whatever optimizer trained it."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: DiT(run.model, rngs=nnx.Rngs(0))))
    sharding = replicated(data_mesh())
    abstract = {"ema": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), params)}
    checkpoints = Checkpoints(Path(run_dir) / "checkpoints", run.train, part=True)
    try:
        _finished_steps(checkpoints, run_dir, step)
        # The training resume's restore: checked against the seal, newer damaged checkpoints skipped (left in place).
        found, state, _, skipped = checkpoints.restore_newest_intact(abstract, newest=step)
    finally:
        checkpoints.close()
    if found is None:
        raise UserError(f"no intact checkpoint of {run_dir} to evaluate: " +
                        "; ".join(f"step {s}: {problem}" for s, problem in skipped) + ".")
    if step is not None and found != step:
        raise UserError(f"the checkpoint at step {step} of {run_dir} is damaged ({skipped[0][1]}); evaluate another "
                        f"--step (the newest intact one before it is {found}).")
    for bad, problem in skipped:
        print(f"warning: checkpoint step {bad} is damaged ({problem}); evaluating step {found} instead",
              file=sys.stderr)
    return found, graphdef, state["ema"]


def training_rows(run: RunConfig, workdir: Path, recorded: dict) -> list[dict]:
    """A leaderboard row per evaluation in the run's metrics.jsonl (the last line of a step wins, as after a
    resume), with the median logged img/s of its training (steady state: not the lines that compiled)."""
    metric = run.eval.metric
    by_step, speeds = {}, []
    for entry in read_metrics(workdir):
        if "compile_s" not in entry and entry.get("img_per_s"):
            speeds.append(entry["img_per_s"])
        if entry.get(metric) is not None:
            by_step[entry["step"]] = entry
    img_per_s = float(np.median(speeds)) if speeds else None
    return [run_row(run, recorded, step=step, metric=metric, value=entry[metric], source="train",
                    num_samples=entry[f"{metric}_samples"], img_per_s=img_per_s)
            for step, entry in sorted(by_step.items())]


def record_results(run: RunConfig, workdir: Path, recorded: dict, leaderboard: Path) -> list[dict]:
    """Appends the run's evaluations that the leaderboard does not hold yet (a resumed run adds nothing twice)."""
    held = {(r["run_id"], r["metric"], int(r["step"])) for r in read_rows(leaderboard) if r["source"] == "train"}
    rows = [r for r in training_rows(run, workdir, recorded) if (r["run_id"], r["metric"], r["step"]) not in held]
    if rows:
        append_rows(rows, leaderboard)
    return rows
