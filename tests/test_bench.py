"""The benchmark command: its JSON fields and numbers that add up."""

import dataclasses
import json
import subprocess
import sys

import pytest

from dit.bench import peak_flops


def run(*args):
    return subprocess.run([sys.executable, "-m", "dit.bench", *args], capture_output=True, text=True)


def test_train_bench_json_fields_are_consistent(monkeypatch, capsys):
    import dit.bench as bench
    from dit.counting import count_gflops
    from tests.helpers import TINY

    # The command's variant is the full-size one: DiT-S/2, 6.06 GMACs per forward -> 36.3 GFLOP per training
    # image (3 forwards, 2 FLOPs per MAC), float32 on the CPU.
    full = bench._variant_model("baseline", None)
    assert full.dtype == "float32" and 3 * 2 * count_gflops(full) == pytest.approx(36.33, abs=0.01)
    # Its step takes a minute to compile and run here; the same command on a tiny model shows what is printed.
    monkeypatch.setattr(bench, "_variant_model", lambda variant, dtype: dataclasses.replace(TINY, dtype=dtype or "float32"))
    assert bench.main(["train", "--variant", "baseline", "--batch", "8", "--steps", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"backend", "variant", "batch", "step_ms", "img_per_s", "model_tflops_per_s", "mfu"} <= set(result)
    assert result["backend"] == "cpu" and result["mfu"] is None and result["batch"] == 8
    assert result["img_per_s"] == pytest.approx(8 / (result["step_ms"] / 1000), rel=1e-6)
    assert result["gflop_per_image"] == pytest.approx(3 * 2 * count_gflops(TINY), rel=1e-9)
    assert result["model_tflops_per_s"] == pytest.approx(result["img_per_s"] * result["gflop_per_image"] / 1e3, rel=1e-6)


def test_torch_reference_step_updates_the_ema_as_dit_does():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from dit.bench import torch_dit_step

    step = torch_dit_step(1)
    assert all(torch.equal(e, p) for e, p in zip(step.ema.parameters(), step.model.parameters()))  # a copy
    # From a zero EMA one update leaves (1 - decay) x the stepped weights: far from both a missing update
    # (zeros) and the weights themselves, which a step at lr 1e-4 barely moves.
    with torch.no_grad():
        for ema in step.ema.parameters():
            ema.zero_()
    step()
    for ema, param in zip(step.ema.parameters(), step.model.parameters()):
        torch.testing.assert_close(ema, (1 - 0.9999) * param.detach(), rtol=1e-5, atol=0)


def test_data_bench_times_a_synthetic_cache_and_refuses_a_missing_one(tmp_path, capsys):
    from dit.bench import main

    assert main(["data", "--batch", "8", "--steps", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch"] == 8 and result["cache"] == "synthetic" and result["records"] == 64
    assert result["dtype"] == "float16" and result["flip"] is True
    assert result["img_per_s"] == pytest.approx(8 / (result["batch_ms"] / 1000), rel=1e-6)
    assert result["host_img_per_s"] == pytest.approx(8 / (result["host_batch_ms"] / 1000), rel=1e-6)
    assert main(["data", "--cache", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert "no latent cache" in error and "python -m dit.data.extract" in error and "Traceback" not in error


def test_bad_batch_is_a_clear_error():
    out = run("train", "--batch", "0")
    assert out.returncode == 2 and "positive" in out.stderr and "Traceback" not in out.stderr


def test_peak_table():
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("cpu") is None


def test_check_appends_each_result_with_date_machine_and_commit(tmp_path, monkeypatch, capsys):
    import dit.bench as bench
    from tests.helpers import TINY

    # The full-size plan takes minutes on a GPU; the same benches on a tiny model show what is written.
    monkeypatch.setattr(bench, "_variant_model", lambda variant, dtype: dataclasses.replace(TINY, dtype=dtype))
    plan = (("loop", dict(variant="baseline", batch=8, steps=2)), ("data", dict(batch=8, steps=2)))
    out = tmp_path / "bench.jsonl"
    out.write_text('{"earlier": 1}\n')
    bench.bench_check(out, plan)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"earlier": 1} and [line["bench"] for line in lines[1:]] == ["loop", "data"]
    for line in lines[1:]:
        assert line["date"] and "cpu" in line["machine"] and line["commit"]
    assert lines[1]["dtype"] == "bfloat16" and lines[1]["steps"] == 2 and lines[1]["img_per_s"] > 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines[1:]
