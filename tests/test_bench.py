"""The benchmark command: its JSON fields and numbers that add up."""

import json
import subprocess
import sys

import pytest

from dit.bench import peak_flops


def run(*args):
    return subprocess.run([sys.executable, "-m", "dit.bench", *args], capture_output=True, text=True)


def test_train_bench_json_fields_are_consistent():
    # The full-size DiT-S/2 step at batch 8 with one timed step: the cheapest run the contract's CLI allows.
    out = run("train", "--variant", "baseline", "--batch", "8", "--steps", "1", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert {"backend", "variant", "batch", "step_ms", "img_per_s", "model_tflops_per_s", "mfu"} <= set(result)
    assert result["backend"] == "cpu" and result["mfu"] is None and result["batch"] == 8
    assert result["img_per_s"] == pytest.approx(8 / (result["step_ms"] / 1000), rel=1e-6)
    # DiT-S/2: 6.06 GMACs per forward -> 36.3 GFLOP per training image (3 forwards, 2 FLOPs per MAC)
    assert result["gflop_per_image"] == pytest.approx(36.33, abs=0.01)
    assert result["model_tflops_per_s"] == pytest.approx(result["img_per_s"] * 36.334e9 / 1e12, rel=1e-3)


def test_bad_batch_is_a_clear_error():
    out = run("train", "--batch", "0")
    assert out.returncode == 2 and "positive" in out.stderr and "Traceback" not in out.stderr


def test_peak_table():
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("cpu") is None
