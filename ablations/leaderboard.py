"""The leaderboard: one CSV row per evaluation, appended under a lock by any number of concurrent runs.

Rows are only ever appended. Each call writes its rows with one `os.write` on an `O_APPEND` file while
holding an exclusive `flock` on `leaderboard.csv.lock`, then fsyncs, so concurrent writers never
interleave and existing bytes are never rewritten.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import numbers
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from dit.errors import UserError

COLUMNS = (
    "date", "run_id", "variant", "params", "gflops", "preset", "dataset", "resolution", "objective", "sampler",
    "sampling_steps", "cfg_scale", "step", "batch_size", "metric", "value", "num_samples", "seed", "img_per_s",
    "hardware", "git_commit",
)
INT_COLUMNS = ("params", "resolution", "sampling_steps", "step", "batch_size", "num_samples", "seed")
FLOAT_COLUMNS = ("gflops", "cfg_scale", "value", "img_per_s")
# A row without these cannot be grouped, compared or traced back to its run; the rest may be None.
REQUIRED = ("date", "run_id", "variant", "dataset", "resolution", "metric", "value", "step", "num_samples", "seed")

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "results" / "leaderboard.csv"
LOCK_TIMEOUT_S = 60.0


def utc_now() -> str:
    """The current time as the `date` column holds it: ISO-8601, UTC, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cell(column: str, value: object) -> str:
    """One value as its CSV text; numbers in a fixed, lossless, locale-free form."""
    if value is None:
        if column in REQUIRED:
            raise ValueError(f"leaderboard column {column!r} is required but is None")
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


def _check_header(path: Path, header: list[str], consequence: str) -> None:
    if tuple(header) == COLUMNS:
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
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                data = format_rows([], header=True) + body
            else:
                first_line = os.pread(fd, 64 * 1024, 0).split(b"\n", 1)[0].decode("utf-8", errors="replace")
                _check_header(path, next(csv.reader([first_line]), []),
                              "rows were not appended and the file was left as it is")
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
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        os.close(lock_fd)  # closing the descriptor releases the flock


def read_rows(path: Path | str = DEFAULT_PATH) -> list[dict[str, str]]:
    """Every row as a dict of strings ([] if the file is missing or empty); UserError if it is malformed."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="", encoding="utf-8") as file:
        lines = csv.reader(file)
        try:
            _check_header(path, next(lines), "it cannot be read as a leaderboard")
            rows = []
            for fields in lines:
                if not fields:  # a blank line holds no row
                    continue
                if len(fields) != len(COLUMNS):
                    raise UserError(
                        f"{path}, line {lines.line_num}: {len(fields)} fields where the header has "
                        f"{len(COLUMNS)} (a partial row from an interrupted write, or a hand edit): "
                        f"{','.join(fields)[:120]!r}. Delete or repair that line."
                    )
                rows.append(dict(zip(COLUMNS, fields)))
        except (UnicodeDecodeError, csv.Error) as error:
            raise UserError(f"{path} is not a readable CSV file ({error}); repair it or pass another path.") from None
    return rows
