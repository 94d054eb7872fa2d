"""The leaderboard: one CSV row per evaluation, appended under a lock by any number of concurrent runs.

Rows are only ever appended. Each call writes its rows with one `os.write` on an `O_APPEND` file while
holding an exclusive `flock` on `leaderboard.csv.lock`, then fsyncs, so concurrent writers never
interleave and existing bytes are never rewritten. The one exception: a file written before the sweep
columns existed (`LEGACY_COLUMNS`) is read as it is, and rewritten once, atomically and under the lock,
with the new columns when a row is next appended to it (its rows kept, `source` train, the rest empty).

`params` and `gflops` are the variant's at DiT-S size (the count the 33M budget checks, config.json's
`budget_params`), whatever the preset trained. `source` tells a training-time evaluation (`train`,
ablations/run.py) from one of a saved checkpoint (`sweep`, `python -m dit.eval.fid --run ... --cfg-scale ...`).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import numbers
import os
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from dit.errors import UserError

if TYPE_CHECKING:
    from dit.config import RunConfig

# The columns of files written before guidance sweeps; such files are read as they are (see the docstring).
LEGACY_COLUMNS = (
    "date", "run_id", "variant", "params", "gflops", "preset", "dataset", "resolution", "objective", "sampler",
    "sampling_steps", "cfg_scale", "step", "batch_size", "metric", "value", "num_samples", "seed", "img_per_s",
    "hardware", "git_commit",
)
COLUMNS = LEGACY_COLUMNS + ("source", "guided_channels", "guidance_low", "guidance_high", "timestep_shift",
                            "reference_sha256")
INT_COLUMNS = ("params", "resolution", "sampling_steps", "step", "batch_size", "num_samples", "seed",
               "guided_channels")
FLOAT_COLUMNS = ("gflops", "cfg_scale", "value", "img_per_s", "guidance_low", "guidance_high", "timestep_shift")
# A row without these cannot be grouped, compared or traced back to its run; the rest may be None.
REQUIRED = ("date", "run_id", "variant", "dataset", "resolution", "metric", "value", "step", "num_samples", "seed",
            "source")
SOURCES = ("train", "sweep")  # evaluated during training, or later from a saved checkpoint

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO / "results" / "leaderboard.csv"
LOCK_TIMEOUT_S = 60.0


def utc_now() -> str:
    """The current time as the `date` column holds it: ISO-8601, UTC, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str:
    """The commit the code ran at, with '-dirty' when the code differs from it (results/, which runs
    themselves write to, does not count)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_row(run: RunConfig, recorded: dict, **columns) -> dict:
    """A leaderboard row of a run's evaluation: what its config.json recorded (`recorded`: the run id, the
    variant's DiT-S-size count and GFLOPs, the data, the machine and commit) and its settings, with
    `columns` (step, metric, value, source, ...) on top."""
    return {"date": utc_now(), "run_id": recorded.get("run_id"), "variant": run.variant,
            "params": recorded.get("budget_params"), "gflops": recorded.get("gflops"), "preset": run.preset,
            "dataset": recorded.get("dataset"), "resolution": recorded.get("resolution"), **setting_columns(run),
            "batch_size": run.train.batch_size, "seed": run.train.seed, "img_per_s": None,
            "hardware": recorded.get("hardware"), "git_commit": recorded.get("git_commit"),
            "reference_sha256": recorded.get("reference_sha256"), **columns}


def setting_columns(run: RunConfig) -> dict:
    """The sampling recipe of an evaluation as leaderboard columns, for the training loop's rows and sweeps alike."""
    from dit.sample import sampler_name  # JAX: only writers call this, never the analysis that imports this file
    cfg = run.eval
    return {"objective": run.train.objective, "sampler": sampler_name(run.train, cfg),
            "sampling_steps": cfg.sampling_steps, "cfg_scale": cfg.cfg_scale, "guided_channels": cfg.guided_channels,
            "guidance_low": cfg.guidance_low, "guidance_high": cfg.guidance_high, "timestep_shift": cfg.timestep_shift}


def _cell(column: str, value: object) -> str:
    """One value as its CSV text; numbers in a fixed, lossless, locale-free form."""
    if value is None or value == "":  # "": an empty cell read back
        if column in REQUIRED:
            raise ValueError(f"leaderboard column {column!r} is required but is {value!r}")
        return ""
    if column in INT_COLUMNS or column in FLOAT_COLUMNS:
        kind = int if column in INT_COLUMNS else float
        wanted = "an integer" if kind is int else "a number"
        if isinstance(value, str):  # already text (e.g. a row read back): kept verbatim if it parses
            try:
                kind(value)
            except ValueError:
                raise ValueError(f"leaderboard column {column!r} holds {value!r}, not {wanted}") from None
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if kind is int else numbers.Real):
            raise ValueError(f"leaderboard column {column!r} holds {value!r}, not {wanted}")
        # float.__repr__ is the shortest text that reads back to the same double (numpy's repr is not).
        return str(int(value)) if kind is int else float.__repr__(float(value))
    text = str(value)
    if column == "source" and text not in SOURCES:
        raise ValueError(f"leaderboard column 'source' holds {text!r}, not one of {', '.join(SOURCES)}")
    if "\n" in text or "\r" in text:
        raise ValueError(f"leaderboard column {column!r} holds a line break: {text!r}")
    if not text and column in REQUIRED:
        raise ValueError(f"leaderboard column {column!r} is required but is empty")
    return text


def format_rows(rows: list[dict], header: bool = False) -> bytes:
    """The rows as CSV bytes, every row checked first; a ValueError names the row and the problem."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(COLUMNS)
    for index, row in enumerate(rows):
        unknown = sorted(set(row) - set(COLUMNS))
        missing = [c for c in COLUMNS if c not in row]
        if unknown or missing:
            raise ValueError(f"leaderboard row {index}: unknown columns {unknown}, missing columns {missing}; "
                             f"the columns are {', '.join(COLUMNS)}")
        try:
            writer.writerow([_cell(c, row[c]) for c in COLUMNS])
        except ValueError as error:
            raise ValueError(f"leaderboard row {index}: {error}") from None
    return buffer.getvalue().encode("utf-8")


def _check_header(path: Path, header: list[str], consequence: str, legacy_ok: bool) -> None:
    if tuple(header) == COLUMNS or legacy_ok and tuple(header) == LEGACY_COLUMNS:
        return
    missing = [c for c in COLUMNS if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    what = (f"missing columns {missing}, unknown columns {unknown}" if missing or unknown
            else "the same columns in a different order")
    raise UserError(
        f"{path} has a different header from this version's leaderboard ({what}), so {consequence}. Use a new "
        f"file (pass another path), or migrate the old file to the columns: {', '.join(COLUMNS)}."
    )


def _lock(lock_path: Path, timeout_s: float) -> int:
    """An exclusive flock on lock_path, waited for up to timeout_s; returns the descriptor that holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline, pause = time.monotonic() + timeout_s, 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if time.monotonic() > deadline:
            os.close(fd)
            # flock is released when its holder exits, so a timeout means a live process is stuck holding it.
            raise UserError(
                f"could not lock {lock_path} within {timeout_s:.0f} s: another process holds it. Find it with "
                f"`fuser {lock_path}` and let it finish or stop it; the lock file itself is harmless to leave."
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def append_rows(rows: list[dict], path: Path | str = DEFAULT_PATH, timeout_s: float = LOCK_TIMEOUT_S) -> None:
    """Append rows to the leaderboard at path (created with its header if new), atomically and durably."""
    path = Path(path)
    body = format_rows(rows)  # every row is checked before the file is touched
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(path.with_name(path.name + ".lock"), timeout_s)
    try:
        if _header(path) == LEGACY_COLUMNS:  # once per file, before its first row of today's columns
            _upgrade(path)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                data = format_rows([], header=True) + body
            else:
                first_line = os.pread(fd, 64 * 1024, 0).split(b"\n", 1)[0].decode("utf-8", errors="replace")
                _check_header(path, next(csv.reader([first_line]), []),
                              "rows were not appended and the file was left as it is", legacy_ok=False)
                # A writer killed mid-write can leave a partial last line: start ours on a fresh line so it
                # is never glued to it (the reader then reports that line for deletion).
                data = body if os.pread(fd, 1, size - 1) == b"\n" else b"\n" + body
            try:
                written = os.write(fd, data)
                while written < len(data):  # only on a full disk or a signal; the lock keeps others out
                    written += os.write(fd, data[written:])
            except BaseException:
                os.ftruncate(fd, size)  # leave no partial row of ours behind
                raise
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # make the new file's directory entry durable too
            _fsync_folder(path.parent)
    finally:
        os.close(lock_fd)  # closing the descriptor releases the flock


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _header(path: Path) -> tuple[str, ...] | None:
    """The file's header row, or None when it is absent or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, newline="", encoding="utf-8", errors="replace") as file:
        return tuple(next(csv.reader([file.readline()]), []))


def _upgrade(path: Path) -> None:
    """Rewrites a LEGACY_COLUMNS file with today's columns, every row kept (as `read_rows` reads it), by an
    atomic rename; the caller holds the lock, so no append can fall between the read and the rename."""
    body = format_rows(read_rows(path), header=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.upgrade")
    try:
        with open(temporary, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def read_rows(path: Path | str = DEFAULT_PATH) -> list[dict[str, str]]:
    """Every row as a dict of strings with every column of COLUMNS ([] if the file is missing or empty); rows of
    a LEGACY_COLUMNS file come with `source` train, `timestep_shift` 0 and the other new columns empty. UserError if
    malformed."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="", encoding="utf-8") as file:
        lines = csv.reader(file)
        try:
            header = next(lines)
            _check_header(path, header, "it cannot be read as a leaderboard", legacy_ok=True)
            missing = {column: "" for column in COLUMNS[len(header):]}
            if missing:
                missing["source"] = "train"  # only the training loop wrote rows before sweeps existed
                missing["timestep_shift"] = "0"  # nor could the sampler shift its time grid
            rows = []
            for fields in lines:
                if not fields:  # a blank line holds no row
                    continue
                if len(fields) != len(header):
                    raise UserError(
                        f"{path}, line {lines.line_num}: {len(fields)} fields where the header has "
                        f"{len(header)} (a partial row from an interrupted write, or a hand edit): "
                        f"{','.join(fields)[:120]!r}. Delete or repair that line."
                    )
                rows.append({**dict(zip(header, fields)), **missing})
        except (UnicodeDecodeError, csv.Error) as error:
            raise UserError(f"{path} is not a readable CSV file ({error}); repair it or pass another path.") from None
    return rows
