"""Run-directory files: atomic JSON, the tolerant metrics reader, the one-writer lock."""

import subprocess
import sys

import pytest

from dit.errors import UserError
from dit.files import write_json_atomic
from dit.rundir import RunLock, append_metrics, holds_run, read_json, read_metrics


def test_json_is_replaced_whole_and_a_damaged_file_is_named(tmp_path):
    write_json_atomic(tmp_path / "summary.json", {"final_step": 4})
    write_json_atomic(tmp_path / "summary.json", {"final_step": 8})
    assert read_json(tmp_path / "summary.json") == {"final_step": 8}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left behind
    assert read_json(tmp_path / "absent.json") is None
    (tmp_path / "config.json").write_text('{"model": ')
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        read_json(tmp_path / "config.json")


def test_metrics_of_a_step_merge_and_torn_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"step": 2, "loss": 1.0})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a write cut off by kill -9 ...
    append_metrics(path, {"step": 4, "loss": 0.5})  # ... then the resumed run's lines, on a fresh line
    append_metrics(path, {"step": 4, "evaluated": True, "fid": 30.0})
    append_metrics(path, {"step": 2, "loss": 0.9})  # a resumed run logs a step again: the later value wins
    with open(path, "a") as f:
        f.write('{"step": 6, "gr{"step": 6, "loss": 0.4}\n')  # an older writer glued a line to a torn one
    with pytest.warns(UserWarning, match="partially written"):
        records = read_metrics(tmp_path)
    assert records == [{"step": 2, "loss": 0.9}, {"step": 4, "loss": 0.5, "evaluated": True, "fid": 30.0},
                       {"step": 6, "loss": 0.4}]


HOLD = """
import sys, time
from dit.rundir import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_one_writer_per_run_directory_and_a_dead_holder_blocks_nobody(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"another process \\(pid {holder.pid}\\) is writing"):
            with RunLock(tmp_path / "run"):
                pass
    finally:
        holder.kill()  # as kill -9: the lock file stays, the lock goes with the process
        holder.wait()
    assert (tmp_path / "run" / ".lock").is_file() and not holds_run(tmp_path / "run")
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").read_text().strip().isdigit()
