"""`python -m dit.bench train|sample|compile ...`: training and sampling speed; ahead-of-time compiles.

`train` times the jitted, data-parallel training step (model, objective, AdamW, EMA: the real step) on
synthetic latents, on whatever backend JAX sees. Model FLOPs come from the analytic count
(`dit.counting`): a training step costs 3 forwards (forward + backward), 2 FLOPs per multiply-add.
MFU is against the dense bfloat16 datasheet peak of the device kind (PEAK_FLOPS), null where unknown.

`compile --variant NAME [--preset P] [--set k=v ...] [--topology v3-8] [--devices N] [--json]` compiles
the real training step for a target without running it (see dit.aot): memory per device against the
device's capacity, FLOPs per step, XLA's cost-model time. DIT_DEVICE_MEMORY_GB overrides the capacity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np

from dit.config import RunConfig, TrainConfig
from dit.counting import count_gflops
from dit.errors import UserError, report

# Dense bfloat16 peak FLOP/s from the vendors' datasheets (no sparsity): per GPU, and per TensorCore for
# TPUs, whose devices hold one core (v2, v3, v5e, v6e) or a chip's two (v4, v5p as megacore).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "V100": 125e12,  # float16 tensor cores; V100 has no bfloat16
    "TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 137.5e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 229.5e12, "TPU v5": 229.5e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str, cores: int = 1) -> float | None:
    """The peak of one device of this kind; `cores` is a TPU device's TensorCore count (num_cores)."""
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in device_kind.lower():
            return peak * (cores if name.startswith("TPU") else 1)
    return None


def _variant_model(variant: str, dtype: str | None):
    """The variant's full-size config with the compute dtype (default: float32 on CPU, bfloat16 elsewhere)."""
    from variants import resolve

    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return dataclasses.replace(resolve(variant), dtype=dtype)


def bench_train(variant: str, batch: int, steps: int, dtype: str | None, objective: str) -> dict:
    from dit.mesh import data_mesh, global_batch
    from dit.objectives import make_objective
    from dit.train import build_training

    backend = jax.default_backend()
    model = _variant_model(variant, dtype)
    run = RunConfig(variant=variant, model=model, train=TrainConfig(batch_size=batch, objective=objective))
    mesh = data_mesh()
    start = time.perf_counter()
    _, state, compiled = build_training(run, make_objective(run), mesh)
    step = compiled.step
    rng = np.random.default_rng(0)
    local = batch // jax.process_count()
    x = rng.normal(size=(local, model.input_size, model.input_size, model.in_channels)).astype(np.float32)
    y = rng.integers(0, model.num_classes, local)
    data = global_batch(mesh, (x, y))
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    img_per_s = batch / step_s
    flops_per_image = 3 * 2 * count_gflops(model) * 1e9
    device_kind = jax.devices()[0].device_kind
    peak = peak_flops(device_kind, getattr(jax.devices()[0], "num_cores", 1))
    model_flops = flops_per_image * img_per_s
    return {
        "backend": backend, "device_kind": device_kind, "devices": jax.device_count(), "variant": variant,
        "batch": batch, "dtype": model.dtype, "objective": objective, "steps": steps, "compile_s": compile_s,
        "step_ms": 1000 * step_s, "img_per_s": img_per_s, "model_tflops_per_s": model_flops / 1e12,
        "gflop_per_image": flops_per_image / 1e9,
        "peak_tflops": None if peak is None else peak * jax.device_count() / 1e12,
        "mfu": None if peak is None else model_flops / (peak * jax.device_count()),
    }


def bench_sample(variant: str, batch: int, steps: int, dtype: str | None, objective: str, sampler: str) -> dict:
    """Times class-balanced sampling of one batch through `steps` sampler steps (cfg scale 1)."""
    from flax import nnx

    from dit.config import EvalConfig
    from dit.model import DiT
    from dit.sample import generate, sampler_name

    backend = jax.default_backend()
    model = _variant_model(variant, dtype)
    graphdef, params = nnx.split(DiT(model, rngs=nnx.Rngs(0)))
    eval_cfg = EvalConfig(num_samples=batch, batch_size=batch, sampling_steps=steps, sampler=sampler)
    train_cfg = TrainConfig(objective=objective)
    start = time.perf_counter()
    generate(graphdef, params, model, train_cfg, eval_cfg, seed=0, progress=False)
    first = time.perf_counter() - start
    times = []
    for seed in (1, 2):
        start = time.perf_counter()
        generate(graphdef, params, model, train_cfg, eval_cfg, seed=seed, progress=False)
        times.append(time.perf_counter() - start)
    batch_s = min(times)
    return {
        "backend": backend, "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "variant": variant, "batch": batch, "dtype": model.dtype, "objective": objective,
        "sampler": sampler_name(train_cfg, eval_cfg), "sampling_steps": steps,
        "compile_s": first - batch_s, "batch_s": batch_s, "img_per_s": batch / batch_s,
        "step_ms": 1000 * batch_s / steps,
    }


def bench_compile(variant: str, preset: str, overrides: list[str], topology: str | None, devices: int | None,
                  cost_model: bool) -> dict:
    """The run's training step compiled for the target (not run): memory, FLOPs, cost-model time."""
    from ablations.presets import PRESETS
    from dit.aot import compile_report, target_mesh
    from dit.config import apply_overrides
    from variants import resolve

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}.")
    run = PRESETS[preset](RunConfig(variant=variant, preset=preset, model=resolve(variant)))
    run = apply_overrides(run, overrides)
    mesh = target_mesh(topology, devices)
    return compile_report(run, mesh, topology or jax.default_backend(), cost_model=cost_model)


def _print_compile(r: dict) -> None:
    capacity = "an unknown capacity" if r["capacity_gb"] is None else f"{r['capacity_gb']:.2f} GB"
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    headroom = "" if r["headroom"] is None else f", {100 * r['headroom']:.0f}% headroom"
    print(f"{r['variant']} ({r['preset']}, {r['dtype']}) on {r['target']}: {r['devices']}x {r['device_kind']}, "
          f"global batch {r['global_batch']} = {r['per_device_batch']} per device in {r['grad_accum']} microbatch(es) "
          f"(grad_accum {r['grad_accum_setting']}), remat {r['remat']}, attention {r['attention']}")
    print(f"  training step per device: {r['memory_gb']:.2f} GB (arguments {r['arguments_gb']:.2f}, temporaries "
          f"{r['temporaries_gb']:.2f}, outputs {r['outputs_gb']:.2f}) of {capacity}: {verdict}{headroom}")
    if r["refused"]:
        print(f"  XLA refused it: {r['refused']}")
    print(f"  {r['flops_per_step'] / 1e12:.3f} TFLOP per device per step (loops counted); sampling evaluation of "
          f"{r['sample_batch']}: {r['sample_memory_gb']:.2f} GB")
    if r["cost_model_ms"] is None:
        print("  XLA's cost model: none on this backend")
    else:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"  XLA's cost model: {r['cost_model_ms']:.1f} ms per step, {r['img_per_s']:.0f} img/s, MFU {mfu}; "
              f"{r['steps']:,} steps in {r['projected_run_hours']:.1f} h")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train", help="time the training step")
    train.add_argument("--variant", default="baseline")
    train.add_argument("--batch", type=int, default=8, help="global batch size")
    train.add_argument("--steps", type=int, default=5, help="timed steps after one compiling step")
    train.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    train.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm")
    train.add_argument("--json", action="store_true", help="print one JSON object")
    sample = sub.add_parser("sample", help="time sampling one batch")
    sample.add_argument("--variant", default="baseline")
    sample.add_argument("--batch", type=int, default=8, help="global batch size")
    sample.add_argument("--steps", type=int, default=10, help="sampler steps")
    sample.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    sample.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm")
    sample.add_argument("--sampler", choices=["", "ddpm", "ddim", "euler", "heun", "sde"], default="")
    sample.add_argument("--json", action="store_true", help="print one JSON object")
    aot = sub.add_parser("compile", help="compile the training step for a target without running it")
    aot.add_argument("--variant", default="baseline")
    aot.add_argument("--preset", default="in100", help="in100 (default), demo or smoke")
    aot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="config overrides as for ablations/run.py, e.g. --set model.dtype=bfloat16")
    aot.add_argument("--topology", help="a TPU target compiled through libtpu, e.g. v3-8, v3-16, v4-8, v5e-4")
    aot.add_argument("--devices", type=int, help="use the first N devices of the target (default: all)")
    aot.add_argument("--no-cost-model", action="store_true",
                     help="skip the second, unrolled compile that XLA's cost-model time needs")
    aot.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.what == "compile":
            result = bench_compile(args.variant, args.preset, args.overrides, args.topology, args.devices,
                                   cost_model=not args.no_cost_model)
            print(json.dumps(result)) if args.json else _print_compile(result)
            return 0
        if args.batch <= 0 or args.steps <= 0:
            raise UserError("--batch and --steps must be positive integers.")
        if args.batch % jax.device_count():
            raise UserError(f"--batch {args.batch} does not split over {jax.device_count()} devices; "
                            f"use a multiple of {jax.device_count()}.")
        if args.what == "train":
            result = bench_train(args.variant, args.batch, args.steps, args.dtype, args.objective)
        else:
            result = bench_sample(args.variant, args.batch, args.steps, args.dtype, args.objective, args.sampler)
    except UserError as error:
        return report(error)
    if args.json:
        print(json.dumps(result))
    elif args.what == "sample":
        print(f"{result['variant']} sampling batch {result['batch']} ({result['sampler']}, {result['sampling_steps']} "
              f"steps, {result['dtype']}) on {result['devices']}x {result['device_kind']}: {result['batch_s']:.2f} s "
              f"per batch, {result['img_per_s']:.2f} img/s, {result['step_ms']:.1f} ms per step")
    else:
        mfu = "n/a (unknown peak)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
        print(f"{result['variant']} batch {result['batch']} {result['dtype']} on {result['devices']}x "
              f"{result['device_kind']} ({result['backend']}): {result['step_ms']:.1f} ms/step, "
              f"{result['img_per_s']:.1f} img/s, {result['model_tflops_per_s']:.2f} model TFLOP/s, MFU {mfu}; "
              f"compile {result['compile_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
