"""`ablations/sweep.py`: fixed run directories, complete runs skipped, cut-off runs resumed, commands printed."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

SWEEP = Path(__file__).resolve().parents[1] / "ablations" / "sweep.py"


def sweep(*args, cwd):
    return subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, cwd=cwd)


def test_print_lists_one_command_per_run_skipping_complete_and_resuming_cut_off_ones(tmp_path):
    (tmp_path / "runs" / "rope-smoke-seed0").mkdir(parents=True)
    (tmp_path / "runs" / "rope-smoke-seed0" / "summary.json").write_text("{}")
    # Cut off before its first checkpoint (config.json, no checkpoints yet): resumed, not started afresh.
    (tmp_path / "runs" / "baseline-smoke-seed1").mkdir(parents=True)
    (tmp_path / "runs" / "baseline-smoke-seed1" / "config.json").write_text("{}")
    out = sweep("--variants", "baseline,rope", "--seeds", "0,1", "--preset", "smoke", "--set", "train.steps=8",
                "--print", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and lines[2] == "# runs/rope-smoke-seed0: complete"
    commands = {line: shlex.split(line) for line in lines if not line.startswith("#")}
    by_dir = {c[c.index("--workdir") + 1]: c for c in commands.values()}
    assert set(by_dir) == {"runs/baseline-smoke-seed0", "runs/baseline-smoke-seed1", "runs/rope-smoke-seed1"}
    assert "--resume" in by_dir["runs/baseline-smoke-seed1"] and "--resume" not in by_dir["runs/baseline-smoke-seed0"]
    assert "train.seed=1" in by_dir["runs/rope-smoke-seed1"] and "train.seed=0" in by_dir["runs/baseline-smoke-seed0"]
    assert all("train.steps=8" in command for command in by_dir.values())
    assert len(list((tmp_path / "runs").glob("*/config.json"))) == 1  # printing runs nothing


def test_bad_names_and_over_budget_variants_fail_before_any_run(tmp_path):
    out = sweep("--variants", "baseline,ropee", "--seeds", "0", "--preset", "smoke", cwd=tmp_path)
    assert out.returncode == 2 and "ropee" in out.stderr and "Traceback" not in out.stderr
    out = sweep("--variants", "baseline", "--seeds", "zero", cwd=tmp_path)
    assert out.returncode == 2 and "--seeds" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_runs_one_after_another_then_skips_the_complete_ones(tmp_path, digits_data):
    import csv
    shutil.copytree(digits_data, tmp_path / "data")
    args = ["--variants", "baseline", "--seeds", "0,1", "--preset", "smoke", "--set", "train.steps=2",
            "--set", "eval.every=2", "--leaderboard", "lb.csv", "--figures", "figures", "--no-progress"]
    first = sweep(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep complete: 2 runs" in first.stdout
    rows = list(csv.DictReader(open(tmp_path / "lb.csv")))
    assert sorted((r["run_id"], r["seed"], r["step"]) for r in rows) == [
        ("baseline-smoke-seed0", "0", "2"), ("baseline-smoke-seed1", "1", "2")]
    again = sweep(*args, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 2
    assert len(list(csv.DictReader(open(tmp_path / "lb.csv")))) == 2  # nothing run or recorded twice
