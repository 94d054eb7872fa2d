"""`ablations/run.py`: budget first, nothing written on bad input, dry runs, listing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert {l.split()[1] for l in lines if l.startswith("preset")} == {"in100", "demo", "smoke"}
