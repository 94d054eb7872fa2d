"""Results on disk as pandas: run directories (config, metrics.jsonl, summary, sample grids) and the leaderboard CSV.

The leaderboard is read here and only here (through dit.leaderboard.read_rows, which checks its header
and rows), so every table and figure sees the same typed frame. Nothing here imports JAX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dit.leaderboard import COLUMNS, DEFAULT_PATH, FLOAT_COLUMNS, INT_COLUMNS, read_rows
from dit import rundir
from dit.errors import UserError

_GRID_NAME = re.compile(r"step_(\d+)\.png$")
# FLOPs of one image in one training step per multiply-add of its forward: 2 FLOPs a multiply-add, and the
# backward costs two forwards (as dit.bench counts: 36.3 GFLOP per image for DiT-S/2's 6.06 GFLOPs).
TRAIN_FLOPS_PER_MAC = 6


@dataclass
class Run:
    """One run directory as read: its config, its metrics (one row per step, its lines merged)."""

    path: Path
    config: dict
    metrics: pd.DataFrame
    summary: dict | None  # None while running, or when killed before finishing
    samples: list[tuple[int, Path]]  # (step, grid PNG), sorted by step

    @property
    def run_id(self) -> str:
        return self.config.get("run_id") or self.path.name

    @property
    def variant(self) -> str:
        return self.config.get("variant", "unknown")

    @property
    def metric(self) -> str:
        """The evaluation metric's key in metrics.jsonl (`fid`, `fd_digits`); inferred for old configs."""
        if self.config.get("metric"):
            return self.config["metric"]
        for name in ("fid", "fd_digits"):
            if name in self.metrics.columns:
                return name
        return "fid"

    @property
    def dataset(self) -> str:
        if self.config.get("dataset"):
            return self.config["dataset"]
        return "digits" if self.metric == "fd_digits" else "imagenet100"


def _numeric(frame: pd.DataFrame, columns) -> pd.DataFrame:
    """`columns` (those present) as numbers: a non-number (null, "NaN", text) and +-Inf become NaN.

    A column holding a null, or absent from a run and filled with None, is object-typed, and one such run
    turns the column of every frame it is concatenated with into objects that numpy cannot compare or
    draw. Inf is a diverged value, no more drawable or rankable than NaN.
    """
    frame = frame.copy()
    infinite = [float("inf"), float("-inf")]
    for column in [c for c in columns if c in frame.columns]:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").replace(infinite, float("nan"))
    return frame


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.jsonl as one row per step, sorted, every column a number (NaN where none was logged).

    Read by dit.rundir, as the launcher reads it: the lines of a step are merged (a training line, then
    its evaluation; a resumed run's repeat), later values winning; torn lines are skipped with a warning.
    """
    records = rundir.read_metrics(path)
    if not records:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    frame = pd.DataFrame.from_records(records)
    return _numeric(frame, frame.columns)  # metrics.jsonl holds numbers, nulls and flags (`evaluated`: 1.0)


def load_run(path: Path) -> Run:
    """One run directory; a damaged config.json or summary.json is a UserError naming the file."""
    path = Path(path)
    config = rundir.read_json(path / rundir.CONFIG)
    if config is None:
        raise UserError(f"{path} holds no {rundir.CONFIG}; it is not a run directory.")
    summary = rundir.read_json(path / rundir.SUMMARY)  # written atomically: absent, or whole
    samples = sorted((int(m.group(1)), p) for p in (path / "samples").glob("step_*.png")
                     if (m := _GRID_NAME.search(p.name)))
    return Run(path, config, read_metrics(path / rundir.METRICS), summary, samples)


def load_runs(runs_dir: str | Path, superseded: bool = False) -> list[Run]:
    """The run directories (those holding config.json) directly under `runs_dir`, sorted by name.

    A run started again with the same variant, preset and seed (after a change of code or settings)
    supersedes the earlier one: only the last started counts as that seed's result, so two attempts are
    never drawn as two seeds. `superseded=True` keeps them all. The leaderboard keeps every row either way.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [load_run(p) for p in sorted(runs_dir.iterdir()) if (p / rundir.CONFIG).is_file()]
    return runs if superseded else latest_runs(runs)


def _seed_key(variant, preset, seed, dataset, metric) -> tuple:
    return str(variant), str(preset), int(seed) if pd.notna(seed) else -1, str(dataset), str(metric)


def started(run: Run) -> str:
    """When the run began (ISO 8601, UTC), from config.json; the file's time for older runs."""
    if run.config.get("started"):
        return run.config["started"]
    from datetime import datetime, timezone
    mtime = (run.path / rundir.CONFIG).stat().st_mtime
    return datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")


def latest_runs(runs: list[Run]) -> list[Run]:
    """One run per (variant, preset, seed, dataset, metric): the last started; in name order."""
    chosen = {}
    for run in sorted(runs, key=started):
        key = _seed_key(run.variant, run.config.get("preset", ""), run.config.get("train", {}).get("seed", 0),
                        run.dataset, run.metric)
        chosen[key] = run
    return sorted(chosen.values(), key=lambda run: run.path.name)


def latest_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Leaderboard rows of the last run per (variant, preset, seed, dataset, metric), as `latest_runs`."""
    if table.empty:
        return table
    first_date = table.groupby("run_id")["date"].min()
    keys = table.drop_duplicates("run_id").set_index("run_id")
    last: dict[tuple, tuple[str, str]] = {}
    for run_id, row in keys.iterrows():
        key = _seed_key(row["variant"], row["preset"], row["seed"], row["dataset"], row["metric"])
        if key not in last or str(first_date[run_id]) >= last[key][0]:
            last[key] = (str(first_date[run_id]), run_id)
    return table[table["run_id"].isin({run_id for _, run_id in last.values()})]


def train_flops(frame: pd.DataFrame) -> pd.Series:
    """Training FLOPs spent by each row's step: steps x batch x FLOPs per image per step, from the `gflops` of
    one forward at the variant's DiT-S size (as config.json and the leaderboard hold it; NaN where unknown).
    So demo runs are costed as their variants would be at full size: a ranking, not their own spend."""
    return frame["step"] * frame["batch_size"] * frame["gflops"] * (TRAIN_FLOPS_PER_MAC * 1e9)


def metrics_frame(runs: list[Run]) -> pd.DataFrame:
    """All runs' logged steps in long form; `value` is the run's eval metric on evaluation steps, else NaN.

    `includes_compile` marks the first logged line of each training session (it carries compile_s), whose
    throughput is not steady-state; `train_flops` is `train_flops` of the step.
    """
    columns = ["run_id", "variant", "preset", "seed", "dataset", "metric", "params", "gflops", "batch_size",
               "step", "loss", "img_per_s", "value", "num_samples", "includes_compile"]
    numbers = ["seed", "params", "gflops", "batch_size", "step", "loss", "img_per_s", "value", "num_samples"]
    parts = []
    for run in runs:
        m = run.metrics
        if m.empty:
            continue
        train = run.config.get("train", {})
        part = pd.DataFrame({
            "run_id": run.run_id, "variant": run.variant, "preset": run.config.get("preset", ""),
            "seed": train.get("seed", 0), "dataset": run.dataset, "metric": run.metric,
            "params": run.config.get("budget_params"), "gflops": run.config.get("gflops"),
            "batch_size": train.get("batch_size"), "step": m["step"],
            "loss": m.get("loss"), "img_per_s": m.get("img_per_s"),
            "value": m.get(run.metric), "num_samples": m.get(f"{run.metric}_samples"),
        }, columns=columns[:-1])
        part = _numeric(part, numbers)  # a key the run never logged (no evaluation yet) is None here
        first = m["step"] == m["step"].min()
        part["includes_compile"] = first | (m["compile_s"].notna() if "compile_s" in m else False)
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True) if parts else _numeric(pd.DataFrame(columns=columns), numbers)
    return frame.assign(train_flops=train_flops(frame))


def read_leaderboard(path: str | Path = DEFAULT_PATH) -> pd.DataFrame:
    """The leaderboard as a typed frame: every column of dit.leaderboard.COLUMNS, the numbers as float64
    (NaN where empty; an infinite, diverged, value NaN too), plus `train_flops`; empty if there is none yet.
    A malformed file or a cell that is not a number is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"the leaderboard {path} is a directory; pass the CSV file (results/leaderboard.csv).")
    frame = pd.DataFrame(read_rows(path), columns=list(COLUMNS), dtype=object)
    for column in INT_COLUMNS + FLOAT_COLUMNS:
        values = []
        for row, text in enumerate(frame[column], start=1):
            try:
                # Python's float() reads the writer's repr-written values back exactly; pandas' parser need not.
                values.append(float(text) if text != "" else float("nan"))
            except ValueError:
                raise UserError(f"{path}, row {row}: column {column!r} holds {text!r}, not a number; "
                                f"repair that row.") from None
        frame[column] = pd.Series(values, index=frame.index, dtype="float64").replace(
            [float("inf"), float("-inf")], float("nan"))
    return frame.assign(train_flops=train_flops(frame))
