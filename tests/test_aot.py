"""Ahead-of-time compiles: `python -m dit.bench compile` for a TPU v3-8 through libtpu (no TPU needed) and
for the local CPU, its FLOPs against dit.counting, and its answers when the step does not fit or no TPU
compiler can load."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from ablations.presets import smoke
from dit.aot import evaluation_programs, program_flops, written_out
from dit.config import RunConfig
from dit.counting import count_gflops
from dit.mesh import data_mesh
from dit.objectives import make_objective
from dit.train import training_program
from variants import resolve

FIELDS = {"target", "devices", "global_batch", "per_device_batch", "grad_accum", "remat", "memory_gb",
          "capacity_gb", "fits", "flops_per_step", "cost_model_ms", "img_per_s", "mfu"}


def compile_json(*args, env=None):
    # A fresh process each: libtpu loads once per process, and only for these commands.
    out = subprocess.run([sys.executable, "-m", "dit.bench", "compile", "--variant", "baseline", "--preset", "smoke",
                          *args, "--json"], capture_output=True, text=True, env={**os.environ, **(env or {})})
    return out


def training_flops_per_image(run: RunConfig) -> float:
    """dit.counting's forward MACs x 2 FLOPs x 3 (forward, and the backward's two products per product)."""
    return 3 * 2 * count_gflops(run.model) * 1e9


def test_compile_for_a_tpu_v3_8_reports_memory_flops_and_cost_model():
    out = compile_json("--topology", "v3-8", "--set", "train.batch_size=16")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert FIELDS <= set(r)
    assert r["target"] == "v3-8" and r["device_kind"] == "TPU v3" and r["devices"] == 8
    assert r["global_batch"] == 16 and r["per_device_batch"] == 2 and r["grad_accum"] == 1
    assert r["blocks"] == "written out"  # model.scan_blocks=auto, lowered for a TPU
    assert r["fits"] is True and r["capacity_gb"] == pytest.approx(15.48 * 2**30 / 1e9, rel=1e-3)
    assert 0 < r["memory_gb"] < r["capacity_gb"] and r["headroom"] == pytest.approx(1 - r["memory_gb"] / r["capacity_gb"])
    assert r["memory_gb"] == pytest.approx(r["arguments_gb"] + r["temporaries_gb"] + r["outputs_gb"])
    # The backward does two products for each of the forward's: 3 forwards per image, 2 images per core.
    expected = training_flops_per_image(smoke(RunConfig(variant="baseline", model=resolve("baseline")))) * 2
    assert r["flops_per_step"] == pytest.approx(expected, rel=0.03)
    # XLA's TPU cost model gives a time; img/s and MFU follow from it and the v3 core's 61.5 TFLOP/s.
    assert r["cost_model_ms"] > 0 and r["cost_model_gb_moved"] > r["arguments_gb"]  # the step reads every parameter
    assert r["img_per_s"] == pytest.approx(16 / (r["cost_model_ms"] / 1000))
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / (r["cost_model_ms"] / 1000) / 61.5e12)
    assert r["sample_memory_gb"] > 0


def test_a_step_larger_than_the_device_is_reported_as_not_fitting():
    out = compile_json("--topology", "v3-8", "--no-cost-model", "--step-only", env={"DIT_DEVICE_MEMORY_GB": "0.0001"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["fits"] is False and r["capacity_gb"] == pytest.approx(0.0001) and r["memory_gb"] > 0.0001
    assert r["cost_model_ms"] is None


def test_no_tpu_compiler_is_one_line_and_exit_2(tmp_path):
    # A libtpu that cannot load, as on a host where it is missing or broken.
    (tmp_path / "libtpu.so").write_text("not a shared library\n")
    out = compile_json("--topology", "v3-8", env={"TPU_LIBRARY_PATH": str(tmp_path / "libtpu.so")})
    assert out.returncode == 2, out.stderr[-3000:]
    assert "libtpu could not compile for a TPU here" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_compile_for_the_local_cpu():
    out = compile_json("--devices", "2", "--set", "train.grad_accum=2")
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert FIELDS <= set(r) and r["target"] == "cpu" and r["devices"] == 2 and r["grad_accum"] == 2
    assert r["per_device_batch"] == 4 and r["fits"] is True and r["blocks"] == "scanned"


def test_unknown_topology_is_a_clear_error():
    out = compile_json("--topology", "v3-9")
    assert out.returncode == 2 and "unknown --topology 'v3-9'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("overrides", [{}, {"grad_accum": 2}])
def test_flops_count_every_loop_iteration(overrides):
    # XLA's cost analysis counts a loop body once; ours counts the scanned blocks and microbatches in full,
    # so the scanned and the unrolled step agree.
    # The same remat policy in both, so that both recompute the same products.
    run = smoke(RunConfig(variant="baseline", model=resolve("baseline")))
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, remat="dots"))
    mesh = data_mesh(jax.devices()[:1])
    k = overrides.get("grad_accum", 1)
    scanned = program_flops(*training_program(run, make_objective(run), mesh, k), devices=1)
    unrolled = program_flops(*training_program(written_out(run), make_objective(run), mesh, k, unroll=True), devices=1)
    assert scanned == unrolled
    assert scanned == pytest.approx(training_flops_per_image(run) * run.train.batch_size, rel=0.03)


def test_evaluation_programs_sample_decode_and_embed_one_batch():
    # A latent model with FID: the guided network, the SD-VAE decode and the Inception, each lowered for
    # the batch (compiling the VAE and the Inception is left to dit.bench compile: it takes minutes here).
    run = smoke(RunConfig(variant="baseline", model=resolve("baseline")))
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, in_channels=4),
                              eval=dataclasses.replace(run.eval, metric="fid", batch_size=2))
    programs = evaluation_programs(run, data_mesh(jax.devices()[:2]))
    assert list(programs) == ["network", "decode", "inception"]
    shapes = {name: jitted.eval_shape(*args) for name, (jitted, args) in programs.items()}
    assert shapes["network"].shape == (2, 8, 8, 8)  # learned sigma: twice the latent channels
    assert shapes["decode"].shape == (2, 64, 64, 3) and shapes["decode"].dtype == jax.numpy.uint8
    assert shapes["inception"].shape == (2, 2048)
