"""The files of a run directory, written and read one way: config.json, metrics.jsonl, summary.json, the lock.

JSON files are replaced atomically, so a reader sees the old file or the new one, never half of one.
metrics.jsonl is appended one line per record; a kill -9 can leave a torn last line, and a resumed run
appends after it, so the reader skips what does not parse and salvages a line glued to a torn one.
A step can have several lines (training metrics, then its evaluation; a resumed run logs steps again):
the reader merges them in file order, later values winning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import warnings
from pathlib import Path

from dit.errors import UserError
from dit.files import write_json_atomic

CONFIG, METRICS, SUMMARY, LOCK = "config.json", "metrics.jsonl", "summary.json", ".lock"


def read_json(path: Path) -> dict | None:
    """A run's JSON file, or None when it does not exist; a damaged one is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); it was damaged outside this program. Restore it from a "
                        f"copy, or move that run directory aside.") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} does not hold a JSON object; restore it from a copy, or move that run directory aside.")
    return content


def record_resume_changes(workdir: Path, changes: dict, step: int) -> None:
    """Writes the settings a resume changed ({"train.lr": [old, new]}) into config.json: the new values,
    and the change with the step it takes effect from, so the record says how every step was trained."""
    if not changes:
        return
    saved = read_json(Path(workdir) / CONFIG)
    for key, (old, new) in changes.items():
        section, name = key.split(".")
        saved[section][name] = new
    saved.setdefault("resume_changes", []).append(
        {"from_step": step, "changes": {key: {"was": old, "now": new} for key, (old, new) in changes.items()}})
    write_json_atomic(Path(workdir) / CONFIG, saved)


def append_metrics(path: Path, record: dict) -> None:
    """Appends one record as one line; after a torn last line (a killed write) it starts a fresh line."""
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        torn = False
        if f.tell():
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + (json.dumps(record) + "\n").encode())


def parse_metrics_line(line: str) -> dict | None:
    """One record of metrics.jsonl, or None for a torn line. A line that does not parse is cut to its
    last '{"step"' (every record starts with its step): the line appended after a torn one."""
    for start in (0, line.rfind('{"step"')):
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            return record
    return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (or of the run directory holding it), one per step, sorted by step:
    the lines of a step merged in file order. Torn lines are skipped with a warning."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    by_step: dict[int, dict] = {}
    if path.is_file():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            record = parse_metrics_line(line)
            if record is None:
                warnings.warn(f"{path}:{number}: skipped a partially written line", stacklevel=2)
                continue
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]


class RunLock:
    """An exclusive lock on a run directory while one process writes it (`with RunLock(workdir): ...`).

    It is a flock on <workdir>/.lock: the kernel releases it when the holder exits however it dies, so a
    lock file left by a dead process never blocks anyone. The file holds the holder's pid, for the message.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(
                f"another process (pid {holder}) is writing the run directory {self.workdir} now; two writers would "
                f"corrupt it. Wait for that process to end (or stop it), then resume with `python ablations/run.py "
                f"--resume --workdir {self.workdir}`; or choose another --workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (removing it would race a new holder)
            self.fd = None


def holds_run(workdir: Path) -> bool:
    """True when the directory holds anything besides a lock file (a run was started there)."""
    workdir = Path(workdir)
    return workdir.is_dir() and any(p.name != LOCK for p in workdir.iterdir())
