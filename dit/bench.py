"""`python -m dit.bench train|sample|data|check|compile ...`: training, sampling and loader speed; the device
check; ahead-of-time compiles.

`train` times the jitted, data-parallel training step (model, objective, AdamW, EMA: the real step) on
synthetic latents, on whatever backend JAX sees. Model FLOPs come from the analytic count
(`dit.counting`): a training step costs 3 forwards (forward + backward), 2 FLOPs per multiply-add.
MFU is against the dense bfloat16 datasheet peak of the device kind (PEAK_FLOPS), null where unknown.

`data [--cache DIR] [--batch N] [--steps K]` times the training input pipeline: batches read from a
latent cache (a synthetic one, float16 32x32x4 as `extract` writes ImageNet-100, when none is given),
on the host alone and then read ahead and put on the devices as the training loop does (`Prefetch`).

`check [--out results/bench.jsonl]` runs CHECK_PLAN on the local devices, appending each result to the
file as it is measured.

`compile --variant NAME [--preset P] [--set k=v ...] [--topology v3-8] [--devices N] [--json]` compiles
the real training step for a target without running it (see dit.aot): memory per device against the
device's capacity, FLOPs per step, XLA's cost-model time. DIT_DEVICE_MEMORY_GB overrides the capacity.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


# The command line names variants and presets; only these two functions turn the names into configs, importing
# the registry and the presets from the layers above the core (docs/architecture.md).
def _variant_model(variant: str, dtype: str | None):
    """The variant's full-size config with the compute dtype (default: float32 on CPU, bfloat16 elsewhere)."""
    from variants import resolve

    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return dataclasses.replace(resolve(variant), dtype=dtype)


def _preset_run(variant: str, preset: str, overrides: list[str]) -> RunConfig:
    """The run `ablations/run.py --variant V --preset P --set ...` would train."""
    from ablations.presets import PRESETS
    from dit.config import apply_overrides
    from variants import resolve

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}.")
    run = PRESETS[preset](RunConfig(variant=variant, preset=preset, model=resolve(variant)))
    return apply_overrides(run, overrides)


def torch_dit_step(batch: int, num_classes: int = 100):
    """One training step of the official DiT-S/2 in PyTorch, as a callable: diffusers' port of it
    (DiTTransformer2DModel), float32, AdamW and the EMA update as DiT's train.py does them, MSE on the
    predicted noise (the VLB term left out: elementwise work on the output, so the reference does a little
    less than our step). Needs the test extra (torch, diffusers)."""
    try:
        import torch
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise UserError("--torch needs PyTorch and diffusers: pip install -e '.[test]'.") from None
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                  num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    ema, ema_decay = copy.deepcopy(model).requires_grad_(False), 0.9999
    x, noise = torch.randn(batch, 4, 32, 32), torch.randn(batch, 4, 32, 32)
    t, y = torch.randint(0, 1000, (batch,)), torch.randint(0, num_classes, (batch,))

    def step() -> None:
        out = model(x + noise, timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(out[:, :4], noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # DiT's update_ema
            for ema_param, param in zip(ema.parameters(), model.parameters()):
                ema_param.mul_(ema_decay).add_(param, alpha=1 - ema_decay)

    step.model, step.ema = model, ema  # for tests to read
    return step


def bench_train(variant: str, batch: int, steps: int, dtype: str | None, objective: str,
                against_torch: bool = False) -> dict:
    from dit.batches import latent_batch
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
    data = global_batch(mesh, latent_batch(x, y))
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    torch_step = torch_dit_step(batch, model.num_classes) if against_torch else None
    if torch_step is not None:
        torch_step()  # first-call allocations
    times, torch_times = [], []
    for _ in range(steps):  # alternately, so that both see the same machine
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        if torch_step is not None:
            start = time.perf_counter()
            torch_step()
            torch_times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    torch_s = statistics.median(torch_times) if torch_times else None
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
        "torch_step_ms": None if torch_s is None else 1000 * torch_s,
        "ratio_to_torch": None if torch_s is None else step_s / torch_s,
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
        # FID-10K's network evaluations at this batch: 10,000 samples x 250 steps (x2 rows with guidance).
        "fid10k_network_minutes": 10_000 / batch * 250 * batch_s / steps / 60,
        "fid10k_network_minutes_guided": 2 * 10_000 / batch * 250 * batch_s / steps / 60,
    }


# ImageNet-100's 126,689 training images make 124 shards of extract's 1,024 records; a synthetic cache of
# as many shards makes a batch meet about as many shards as there, so the per-shard reads cost the same.
SYNTHETIC_SHARDS = 124


def write_synthetic_cache(directory: Path, records: int) -> None:
    """A latent cache of random float16 32x32x4 posteriors, written by the real writer."""
    from dit.data import cache as latent_cache

    shape, rng = (32, 32, 4), np.random.default_rng(0)
    ranges = latent_cache.shard_ranges(records, -(-records // SYNTHETIC_SHARDS))
    for k, (start, stop) in enumerate(ranges):
        mean = rng.standard_normal((stop - start, 2, *shape), np.float32).astype(np.float16)
        latent_cache.write_shard(directory, k, latent_cache.Shard(
            mean, np.full_like(mean, 0.05), rng.integers(0, 100, stop - start).astype(np.int32),
            np.arange(start, stop), []))
    latent_cache.build_manifest(directory, {"dataset": "synthetic", "scale_factor": 0.18215, "dtype": "float16"},
                                [str(c) for c in range(100)], {}, shape, len(ranges))


def bench_data(cache: str | None, batch: int, steps: int) -> dict:
    """Loader speed after a first epoch: `steps` batches read from the cache on the host, then `steps`
    read ahead and put on the devices through `Prefetch`, as training takes them."""
    from dit.batches import Prefetch
    from dit.data.cache import LatentCache
    from dit.data.pipeline import CacheBatches
    from dit.mesh import data_mesh, global_batch

    with tempfile.TemporaryDirectory(prefix="dit-bench-cache-") as scratch:
        if cache is None:
            write_synthetic_cache(Path(scratch), records=8 * batch)  # 8 batches an epoch: epochs turn over
        latents = LatentCache(cache or scratch)
        source = CacheBatches(latents, batch, seed=0)
        for _ in range(source.order.batches_per_epoch):  # one epoch first: every page of the maps touched
            source.next()
        start = time.perf_counter()
        for _ in range(steps):
            source.next()
        host_s = time.perf_counter() - start
        mesh = data_mesh()
        with Prefetch(source, lambda b: global_batch(mesh, b), steps + 1) as batches:
            jax.block_until_ready(batches.next())  # the thread started, the first transfer done
            start = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(batches.next())
            device_s = time.perf_counter() - start
    return {
        "backend": jax.default_backend(), "devices": jax.device_count(), "batch": batch, "steps": steps,
        "cache": cache or "synthetic", "records": len(latents), "shards": len(latents.manifest["shards"]),
        "dtype": latents.dtype.name, "flip": source.flip, "img_per_s": batch * steps / device_s,
        "host_img_per_s": batch * steps / host_s, "batch_ms": 1000 * device_s / steps,
        "host_batch_ms": 1000 * host_s / steps,
    }


def bench_loop(variant: str, batch: int, steps: int, dtype: str | None) -> dict:
    """`steps` steps of the real training loop (dit.run.train_run: prefetch, logging, a final checkpoint) on
    random in-memory latents: the img/s the loop logs, which the step alone (bench train) does not see."""
    from dit.batches import ArrayBatches
    from dit.objectives import make_objective
    from dit.rundir import read_metrics
    from dit.run import train_run

    model = _variant_model(variant, dtype)
    log_every = max(1, steps // 4)
    run = RunConfig(variant=variant, model=model, train=TrainConfig(
        batch_size=batch, steps=steps, log_every=log_every, ckpt_every=steps, jax_smi=False))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * batch, model.input_size, model.input_size, model.in_channels)).astype(np.float32)
    source = ArrayBatches(x, rng.integers(0, model.num_classes, len(x)), batch, seed=0)
    with tempfile.TemporaryDirectory(prefix="dit-bench-loop-") as workdir:
        start = time.perf_counter()
        train_run(run, Path(workdir) / "run", source, make_objective(run), progress=False)
        wall_s = time.perf_counter() - start
        logged = [r["img_per_s"] for r in read_metrics(Path(workdir) / "run" / "metrics.jsonl") if "img_per_s" in r]
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "variant": variant, "batch": batch, "dtype": model.dtype,
            "steps": steps, "img_per_s": statistics.median(logged[1:] or logged), "wall_s": wall_s}


CHECK_PLAN = (  # what `check` runs, in order; meant to take under 8 minutes on one GPU (not yet run on one)
    ("train", dict(variant="baseline", batch=256, steps=20)),
    ("train", dict(variant="rope_swiglu", batch=256, steps=20)),
    ("train", dict(variant="patch1", batch=256, steps=5)),
    ("sample", dict(variant="baseline", batch=256, steps=20)),
    ("loop", dict(variant="baseline", batch=256, steps=200)),
    ("data", dict(batch=256, steps=100)),
)


def bench_check(out: Path, plan=CHECK_PLAN) -> list[dict]:
    """The device check: each CHECK_PLAN bench in bfloat16 on the local devices, each result appended to
    `out` (results/bench.jsonl) as soon as it is measured, with the date, the machine and the commit."""
    import datetime
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = jax.devices()[0]
    machine = f"{jax.device_count()}x {device.device_kind}, JAX {jax.__version__} ({jax.default_backend()})"
    runs = {"train": lambda **kw: bench_train(dtype="bfloat16", objective="ddpm", **kw),
            "sample": lambda **kw: bench_sample(dtype="bfloat16", objective="ddpm", sampler="", **kw),
            "loop": lambda **kw: bench_loop(dtype="bfloat16", **kw),
            "data": lambda **kw: bench_data(cache=None, **kw)}
    results = []
    for bench, kwargs in plan:
        result = {"date": datetime.date.today().isoformat(), "machine": machine, "commit": commit, "bench": bench,
                  **runs[bench](**kwargs)}
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def bench_compile(run: RunConfig, topology: str | None, devices: int | None, cost_model: bool,
                  decode_and_embed: bool = True) -> dict:
    """The run's training step compiled for the target (not run): memory, FLOPs, cost-model time."""
    from dit.aot import compile_report, target_mesh

    mesh = target_mesh(topology, devices)
    return compile_report(run, mesh, topology or jax.default_backend(), cost_model=cost_model,
                          decode_and_embed=decode_and_embed)


def _print_compile(r: dict) -> None:
    capacity = "an unknown capacity" if r["capacity_gb"] is None else f"{r['capacity_gb']:.2f} GB"
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    headroom = "" if r["headroom"] is None else f", {100 * r['headroom']:.0f}% headroom"
    print(f"{r['variant']} ({r['preset']}, {r['dtype']}) on {r['target']}: {r['devices']}x {r['device_kind']}, "
          f"global batch {r['global_batch']} = {r['per_device_batch']} per device in {r['grad_accum']} microbatch(es) "
          f"(grad_accum {r['grad_accum_setting']}), remat {r['remat']}, attention {r['attention']}, blocks {r['blocks']}")
    print(f"  training step per device: {r['memory_gb']:.2f} GB (arguments {r['arguments_gb']:.2f}, temporaries "
          f"{r['temporaries_gb']:.2f}, outputs {r['outputs_gb']:.2f}) of {capacity}: {verdict}{headroom}")
    if r["refused"]:
        print(f"  XLA refused it: {r['refused']}")
    print(f"  {r['flops_per_step'] / 1e12:.3f} TFLOP per device per step (loops counted)")
    parts = [(name, r[f"eval_{name}_memory_gb"], r[f"eval_{name}_ms"]) for name in ("network", "decode", "inception")
             if f"eval_{name}_memory_gb" in r]
    print(f"  evaluation, global batch {r['eval_batch']}: " + ", ".join(
        f"{name} {memory:.2f} GB" + ("" if ms is None else f" {ms:.1f} ms") for name, memory, ms in parts))
    if r["eval_minutes"] is not None:
        print(f"  {r['eval_samples']:,} samples x {r['eval_sampling_steps']} steps (guidance {r['eval_cfg_scale']}): "
              f"{r['eval_minutes']:.1f} min per evaluation by XLA's cost model")
    if r["cost_model_ms"] is None:
        print("  XLA's cost model: none on this backend")
    else:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"  XLA's cost model: {r['cost_model_ms']:.1f} ms per step ({r['cost_model_gb_moved']:.1f} GB moved "
              f"per device), {r['img_per_s']:.0f} img/s, MFU {mfu}; "
              f"{r['steps']:,} steps in {r['projected_run_hours']:.1f} h")
        if r["blocks"] == "scanned":  # the model counts a loop body once, so it times the written-out program
            print("  (that time is of the blocks written out; the scanned program compiled here is slower)")


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
    train.add_argument("--torch", action="store_true",
                       help="also time the official DiT-S/2 in PyTorch (diffusers' port, float32, AdamW, MSE) "
                            "alternately with ours and print the ratio (needs the test extra)")
    train.add_argument("--json", action="store_true", help="print one JSON object")
    sample = sub.add_parser("sample", help="time sampling one batch")
    sample.add_argument("--variant", default="baseline")
    sample.add_argument("--batch", type=int, default=8, help="global batch size")
    sample.add_argument("--steps", type=int, default=10, help="sampler steps")
    sample.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    sample.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm")
    sample.add_argument("--sampler", choices=["", "ddpm", "ddim", "euler", "heun", "sde"], default="")
    sample.add_argument("--json", action="store_true", help="print one JSON object")
    data = sub.add_parser("data", help="time the training input pipeline")
    data.add_argument("--cache", help="a latent cache directory (default: a synthetic one, removed afterwards)")
    data.add_argument("--batch", type=int, default=256, help="global batch size")
    data.add_argument("--steps", type=int, default=100, help="timed batches, on the host and onto the devices")
    data.add_argument("--json", action="store_true", help="print one JSON object")
    check = sub.add_parser("check", help="the device check: every bench on this machine, appended to a file")
    check.add_argument("--out", default="results/bench.jsonl", help="JSON lines file to append to")
    aot = sub.add_parser("compile", help="compile the training step for a target without running it")
    aot.add_argument("--variant", default="baseline")
    aot.add_argument("--preset", default="in100", help="in100 (default), demo or smoke")
    aot.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="config overrides as for ablations/run.py, e.g. --set model.dtype=bfloat16")
    aot.add_argument("--topology", help="a TPU target compiled through libtpu, e.g. v3-8, v3-16, v4-8, v5e-4")
    aot.add_argument("--devices", type=int, help="use the first N devices of the target (default: all)")
    aot.add_argument("--no-cost-model", action="store_true",
                     help="skip the second, unrolled compile that XLA's cost-model time needs")
    aot.add_argument("--step-only", action="store_true",
                     help="of the evaluation, compile only the network (not the SD-VAE decode and the Inception)")
    aot.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.what == "check":
            bench_check(Path(args.out))
            return 0
        if args.what == "compile":
            result = bench_compile(_preset_run(args.variant, args.preset, args.overrides), args.topology,
                                   args.devices, cost_model=not args.no_cost_model, decode_and_embed=not args.step_only)
            print(json.dumps(result)) if args.json else _print_compile(result)
            return 0
        if args.batch <= 0 or args.steps <= 0:
            raise UserError("--batch and --steps must be positive integers.")
        if args.batch % jax.device_count():
            raise UserError(f"--batch {args.batch} does not split over {jax.device_count()} devices; "
                            f"use a multiple of {jax.device_count()}.")
        if args.what == "train":
            result = bench_train(args.variant, args.batch, args.steps, args.dtype, args.objective, args.torch)
        elif args.what == "data":
            result = bench_data(args.cache, args.batch, args.steps)
        else:
            result = bench_sample(args.variant, args.batch, args.steps, args.dtype, args.objective, args.sampler)
    except UserError as error:
        return report(error)
    if args.json:
        print(json.dumps(result))
    elif args.what == "data":
        print(f"input pipeline, batch {result['batch']} from {result['cache']} ({result['records']:,} records in "
              f"{result['shards']} shards, {result['dtype']}): {result['host_img_per_s']:,.0f} img/s read on the "
              f"host, {result['img_per_s']:,.0f} img/s read ahead onto {result['devices']}x {result['backend']} "
              f"({result['batch_ms']:.2f} ms per batch)")
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
        if result["torch_step_ms"] is not None:
            print(f"  official DiT-S/2 in PyTorch (diffusers' port), alternately in this run: "
                  f"{result['torch_step_ms']:.1f} ms/step; ours / PyTorch = {result['ratio_to_torch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
