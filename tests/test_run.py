"""`ablations/run.py`: budget first, nothing written on bad input, dry runs, listing."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dit.rundir import read_metrics

RUN = Path(__file__).resolve().parents[1] / "ablations" / "run.py"


def run(*args, cwd):
    return subprocess.run([sys.executable, str(RUN), *args], capture_output=True, text=True, cwd=cwd)


def test_dry_run_prints_resolved_config_and_count(tmp_path):
    out = run("--variant", "rope_swiglu", "--preset", "demo", "--set", "train.steps=7", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert config["variant"] == "rope_swiglu" and config["train"]["steps"] == 7
    assert config["model"]["pos_embed"] == "rope" and config["model"]["mlp"] == "swiglu"
    assert "32,525,600 trainable parameters" in out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("preset", ["in100", "smoke"])
def test_over_budget_exits_2_and_writes_nothing(tmp_path, preset):
    workdir = tmp_path / "run"
    out = run("--variant", "baseline", "--preset", preset, "--set", "model.depth=13", "--workdir", str(workdir),
              cwd=tmp_path)
    assert out.returncode == 2
    assert "35,179,424" in out.stderr and "33,000,000" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--variant", "rope_swigl", "--dry-run"], "closest known name is 'rope_swiglu'"),
    (["--variant", "baseline", "--preset", "fast", "--dry-run"], "unknown preset"),
    (["--variant", "baseline", "--set", "train.stepz=3", "--dry-run"], "Did you mean train.steps"),
    (["--dry-run"], "no variant given"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_list_shows_variants_and_presets(tmp_path):
    out = run("--list", cwd=tmp_path)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert any(l.startswith("variant baseline") and "32,519,456" in l for l in lines)
    assert {l.split()[1] for l in lines if l.startswith("preset")} == {
        "in100", "in100_flow_repa", "demo", "demo_paper", "demo_flow_repa", "smoke"}


# End to end with the smoke preset. One working directory for the module, holding the session's digits data
# and their feature classifier in ./data/digits, where a user's first run builds them.
@pytest.fixture(scope="module")
def home(tmp_path_factory, digits_data):
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(digits_data, home / "data")
    return home


def leaderboard(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smoke_run_end_to_end(home):
    out = run("--variant", "rope_swiglu", "--preset", "smoke", "--set", "eval.every=2", "--workdir", "runs/a",
              "--leaderboard", "lb.csv", "--figures", "figures", "--no-progress", cwd=home)
    assert out.returncode == 0, out.stderr[-3000:]
    workdir = home / "runs" / "a"
    config = json.loads((workdir / "config.json").read_text())
    assert config["variant"] == "rope_swiglu" and config["budget_params"] == 32_525_600
    assert config["run_id"] == "a" and config["dataset"] == "digits" and config["git_commit"]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # Each evaluation is a line of its own after the step's training line.
    assert [(m["step"], "evaluated" in m) for m in lines] == [(1, False), (2, False), (2, True), (3, False),
                                                              (4, False), (4, True)]
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and [m["step"] for m in metrics if "fd_digits" in m] == [2, 4]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == 4 and len(summary["params_sha256"]) == 64
    assert (workdir / "samples" / "step_0000004.png").is_file()
    rows = leaderboard(home / "lb.csv")
    assert [(r["run_id"], r["step"], r["metric"], r["dataset"]) for r in rows] == [
        ("a", "2", "fd_digits", "digits"), ("a", "4", "fd_digits", "digits")]
    assert float(rows[-1]["value"]) == pytest.approx(summary["last_metrics"]["fd_digits"])
    assert list((home / "figures").glob("*.png")) and "done: step 4" in out.stdout

    # The same directory again without --resume: refused, nothing changed.
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    again = run("--variant", "rope_swiglu", "--preset", "smoke", "--workdir", "runs/a", "--leaderboard", "lb.csv",
                cwd=home)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before

    # --resume of the finished run: it says so and exits 0; nothing in it or in the leaderboard changes.
    board = (home / "lb.csv").read_bytes()
    done = run("--resume", "--workdir", "runs/a", "--leaderboard", "lb.csv", cwd=home)
    assert done.returncode == 0 and "is complete (step 4, fd_digits" in done.stdout, done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before and (home / "lb.csv").read_bytes() == board


def kill_while_evaluating(args, home, workdir, step):
    """Starts run.py and kills it (SIGKILL: no chance to save, as a crash or a lost machine) once the
    training line of `step` is written and its evaluation line is not: during that evaluation."""
    import signal
    import time
    process = subprocess.Popen([sys.executable, str(RUN), *args], cwd=home, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline, killed = time.time() + 300, False
    while time.time() < deadline and process.poll() is None:
        lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").exists() else []
        steps = [(entry["step"], "evaluated" in entry) for entry in map(json.loads, lines)]
        if (step, False) in steps and (step, True) not in steps:
            process.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    out, err = process.communicate()
    assert killed, f"run.py ended before its evaluation at step {step} could be cut off: {err[-2000:]}"


def test_evaluations_killed_midway_are_redone_on_resume_and_a_finished_run_is_left_alone(home):
    workdir = home / "runs" / "k"
    # Evaluations long enough (64 samples, 50 sampling steps) for the kill to land inside one.
    args = ["--variant", "baseline", "--preset", "smoke", "--set", "train.steps=40", "--set", "train.ckpt_every=6",
            "--set", "eval.every=20", "--set", "eval.num_samples=64", "--set", "eval.sampling_steps=50",
            "--workdir", "runs/k", "--leaderboard", "lb-k.csv", "--figures", "fig-k", "--no-progress"]
    kill_while_evaluating(args, home, workdir, 20)
    assert not (home / "lb-k.csv").exists() and not (workdir / "summary.json").exists()
    # The resume needs only the run directory; it is killed again during the last evaluation.
    resume = ["--resume", "--workdir", "runs/k", "--leaderboard", "lb-k.csv", "--figures", "fig-k", "--no-progress"]
    kill_while_evaluating(resume, home, workdir, 40)
    assert not (workdir / "summary.json").exists()
    resumed = run(*resume, cwd=home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = leaderboard(home / "lb-k.csv")
    assert [int(r["step"]) for r in rows] == [20, 40]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final_step"] == 40 and summary["last_metrics"]["fd_digits"] == pytest.approx(float(rows[-1]["value"]))
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == ["step_0000020.png", "step_0000040.png"]
    assert "done: step 40, fd_digits" in resumed.stdout


@pytest.mark.parametrize("args, message", [
    (["--variant", "baseline", "--preset", "in100"], "python -m dit.data.extract"),
    (["--variant", "baseline", "--preset", "smoke", "--set", "eval.metric=fid"], "python -m dit.eval.ref_stats"),
    (["--variant", "baseline", "--preset", "smoke", "--set", "model.num_classes=7"], "--set model.num_classes=10"),
    (["--variant", "baseline", "--preset", "smoke", "--resume", "--workdir", "runs/none"], "--resume"),
    (["--variant", "baseline", "--preset", "smoke", "--set", "data.images=nowhere"], "nowhere does not exist"),
])
def test_missing_inputs_are_one_clear_error_and_create_no_run(home, args, message):
    out = run(*args, "--leaderboard", "lb-x.csv", cwd=home)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (home / "lb-x.csv").exists() and not any((home / "runs").glob("baseline-*"))


def test_a_step_that_does_not_fit_the_device_is_refused_before_the_run_starts(home):
    import os
    env = {**os.environ, "DIT_DEVICE_MEMORY_GB": "0.0001"}  # a device of 100 KB: no microbatch fits
    out = subprocess.run([sys.executable, str(RUN), "--variant", "baseline", "--preset", "smoke", "--workdir",
                          "runs/nofit", "--leaderboard", "lb-nofit.csv", "--no-progress"],
                         capture_output=True, text=True, cwd=home, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "does not fit" in out.stderr and "train.grad_accum" in out.stderr and "model.remat" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (home / "runs" / "nofit").exists() and not (home / "lb-nofit.csv").exists()


def test_unwritable_places_are_refused_before_the_run_starts(home):
    (home / "a-file").write_text("")
    for args, message in ((["--workdir", "a-file/run"], "cannot write the run directory a-file/run"),
                          (["--workdir", "runs/w", "--leaderboard", "/proc/dit/lb.csv"], "cannot write the leaderboard")):
        out = run("--variant", "baseline", "--preset", "smoke", *args, cwd=home)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (home / "runs" / "w").exists()


def test_a_disk_without_room_for_the_checkpoints_is_refused(home, monkeypatch, capsys):
    import shutil
    from ablations.run import main
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    assert main(["--variant", "baseline", "--preset", "smoke", "--workdir", str(home / "runs" / "full")]) == 2
    err = capsys.readouterr().err
    assert "has 0.00 GB free" in err
    assert "train.keep_checkpoints" in err and not (home / "runs" / "full").exists()


def test_a_resume_keeps_the_run_settings_except_the_recovery_ones(tmp_path):
    import argparse
    from ablations.run import resumed_config
    from dit.config import RunConfig, to_dict
    from dit.errors import UserError
    (tmp_path / "config.json").write_text(json.dumps({**to_dict(RunConfig(variant="rope", preset="smoke")),
                                                      "budget_params": 32_000_000, "gflops": 6.0}))
    args = lambda *sets, variant=None: argparse.Namespace(variant=variant, preset=None, overrides=list(sets))
    config, cost, changes = resumed_config(tmp_path, args())
    assert config.variant == "rope" and config.preset == "smoke" and changes == {} and cost.params == 32_000_000
    _, _, changes = resumed_config(tmp_path, args("train.lr=5e-5", "train.grad_clip=1.0"))
    assert changes == {"train.lr": [1e-4, 5e-5], "train.grad_clip": [0.0, 1.0]}
    with pytest.raises(UserError, match="model.depth: 12 in the run, 13 now"):
        resumed_config(tmp_path, args("model.depth=13"))
    with pytest.raises(UserError, match="a run of variant 'rope', not 'baseline'"):
        resumed_config(tmp_path, args(variant="baseline"))
