"""Ahead-of-time compiles of a run's programs for a target, without running them: memory, FLOPs, cost model.

A target is a TPU topology (libtpu compiles for it on any Linux host, no TPU needed) or the local
devices. Memory comes from XLA's analysis of the compiled program and is exact per device. FLOPs are
counted on the traced program (dot and conv products, every loop iteration counted, rematerialised
products included), since XLA's own count takes a loop body once. XLA's cost-model time
(`optimal_seconds`, a roofline estimate, not a stopwatch) is read from a second compile with every
loop written out, where the backend has a cost model (TPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx

from dit.attention import key_blocks_written_out
from dit.config import RunConfig
from dit.counting import product_macs
from dit.errors import UserError
from dit.memory import DoesNotFit, StepMemory, device_capacity
from dit.mesh import batch_sharded, data_mesh, replicated

# `--topology` names (as TPU VMs are sold) -> libtpu topology names. v2/v3 have 2 cores (devices) per chip.
TOPOLOGIES = {"v2-8": "v2:2x2", "v3-8": "v3:2x2", "v3-16": "v3:4x2", "v3-32": "v3:4x4", "v4-8": "v4:2x2x1",
              "v4-16": "v4:2x2x2", "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4",
              "v5p-8": "v5p:2x2x1", "v6e-1": "v6e:1x1", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4"}


def topology_devices(name: str) -> list:
    """The devices of a TPU topology description, compiled for from this host through libtpu."""
    if name not in TOPOLOGIES:
        raise UserError(f"unknown --topology {name!r}; known: {', '.join(TOPOLOGIES)}.")
    # libtpu reads these when it first loads; the host itself stays a CPU machine.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles on one host at once
    jax.config.update("jax_platforms", "cpu")  # the local backend: no TPU runtime is needed to compile
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[name]).devices)
    except Exception as error:  # no libtpu, or one that cannot load here
        raise UserError(f"--topology {name}: libtpu could not compile for a TPU here ({str(error).splitlines()[0]}); "
                        f"install it with pip install -e '.[tpu]' on a Linux host.") from None


def target_mesh(topology: str | None, devices: int | None):
    """A data-parallel mesh over the first `devices` devices of the topology, or of the local devices."""
    available = topology_devices(topology) if topology else jax.devices()
    n = devices or len(available)
    if not 0 < n <= len(available):
        raise UserError(f"--devices {n}: the target has {len(available)} devices; give 1 to {len(available)}.")
    return data_mesh(available[:n])


def program_flops(jitted, args, devices: int) -> float:
    """FLOPs per device of one call: 2 x the multiply-adds of every matrix product and convolution in the
    traced program, loops counted per iteration, split evenly over the data-parallel devices."""
    platform = next(iter(jax.tree.leaves(args)[0].sharding.device_set)).platform  # the branch lowered there
    return 2 * product_macs(jitted.trace(*args).jaxpr.jaxpr, platform) / devices


def cost_model_seconds(compiled) -> float | None:
    """XLA's cost-model time of a compiled program, None where the backend gives none (or a bad one)."""
    try:
        seconds = (compiled.cost_analysis() or {}).get("optimal_seconds")
    except Exception:
        return None
    return float(seconds) if seconds is not None and seconds > 0 else None


def _refused(error: DoesNotFit, jitted, args, device) -> StepMemory:
    """The memory of a program XLA refused: its temporaries as XLA's message states them (GiB), and its
    arguments from their shapes."""
    found = re.search(r"HLO temporaries \(([\d.]+)([GM])\)", str(error))
    temporaries = float(found.group(1)) * 2 ** (30 if found.group(2) == "G" else 20) if found else 0
    arguments = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(args))
    return StepMemory(int(arguments), 0, int(temporaries), device_capacity(device))


def written_out(run: RunConfig) -> RunConfig:
    """The same run with its blocks written out, for XLA's cost model (which counts a loop's body once;
    trace it within dit.attention.key_blocks_written_out for blockwise attention's loops)."""
    return dataclasses.replace(run, model=dataclasses.replace(run.model, scan_blocks=False))


def sampling_program(run: RunConfig, mesh):
    """One network evaluation of sampling (the guided model on eval.batch_size) and its sharded arguments."""
    from dit.guidance import guided_model_fn
    from dit.model import DiT

    m = run.model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: DiT(m, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), params)
    n, sharded = run.eval.batch_size, batch_sharded(mesh)
    x = jax.ShapeDtypeStruct((n, m.input_size, m.input_size, m.in_channels), jnp.float32, sharding=sharded)
    t = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sharded)
    y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharded)
    guided_channels = run.eval.guided_channels or None

    def evaluate(params, x, t, y):
        model = nnx.merge(graphdef, params)
        return guided_model_fn(model, run.eval.cfg_scale, m.num_classes, guided_channels)(x, t, y)

    return jax.jit(evaluate), (params, x, t, y)


def _abstract(module, mesh):
    """A network's (graphdef, ShapeDtypeStructs of its state replicated over the mesh), from shapes alone."""
    graphdef, state = nnx.split(nnx.eval_shape(module))
    return graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), state)


def cost_model_bytes(compiled) -> float:
    """The bytes a compiled program reads and writes per device by XLA's cost analysis ("bytes accessed")."""
    return float((compiled.cost_analysis() or {}).get("bytes accessed", 0.0))


def evaluation_programs(run: RunConfig, mesh) -> dict:
    """The programs of one evaluation batch (eval.batch_size samples), name -> (jitted, args): the guided
    network evaluation (run eval.sampling_steps times), the SD-VAE decode to uint8 images (latent models),
    and the FID Inception's features (eval.metric fid)."""
    from dit.eval.inception import InceptionV3, preprocess
    from dit.sample import decode_in_chunks
    from dit.vae import SCALE_FACTOR, AutoencoderKL, VAEConfig

    m, n, sharded = run.model, run.eval.batch_size, batch_sharded(mesh)
    programs = {"network": sampling_program(run, mesh)}
    side = m.input_size
    if m.in_channels == VAEConfig.latent_channels:  # latents of the SD-VAE; 3 channels are pixels
        vae_def, vae_params = _abstract(lambda: AutoencoderKL(VAEConfig(), rngs=nnx.Rngs(0)), mesh)
        latents = jax.ShapeDtypeStruct((n, side, side, m.in_channels), jnp.float32, sharding=sharded)
        vae_decode = lambda params, z: nnx.merge(vae_def, params).decode(z / SCALE_FACTOR)
        decode = lambda params, z: decode_in_chunks(vae_decode, params, z, mesh.devices.size)
        programs["decode"] = jax.jit(decode), (vae_params, latents)
        side *= 2 ** (len(VAEConfig.block_out_channels) - 1)
    if run.eval.metric == "fid":
        inception_def, inception_state = _abstract(lambda: InceptionV3(rngs=nnx.Rngs(0)), mesh)
        images = jax.ShapeDtypeStruct((n, side, side, 3), jnp.uint8, sharding=sharded)
        features = lambda state, images: nnx.merge(inception_def, state)(preprocess(images))[0]
        programs["inception"] = jax.jit(features), (inception_state, images)
    return programs


def evaluation_report(run: RunConfig, mesh, cost_model: bool = True, decode_and_embed: bool = True) -> dict:
    """Memory and cost-model time of each evaluation program, and the projected minutes of one
    evaluation of eval.num_samples samples (FID-10K for in100): batches x (steps x network + decode +
    Inception), where the backend has a cost model. Without `decode_and_embed`, only the network's
    program (the same VAE and Inception for every variant: minutes of compiling saved in a table)."""
    device = mesh.devices.flat[0]
    report, seconds = {}, {}
    programs = evaluation_programs(run, mesh)
    for name, (jitted, args) in (programs if decode_and_embed else {"network": programs["network"]}).items():
        try:
            compiled = jitted.lower(*args).compile()
            memory = StepMemory.of(compiled, device)
            seconds[name] = cost_model_seconds(compiled) if cost_model else None
        except Exception as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            memory, seconds[name] = _refused(DoesNotFit(str(error)), jitted, args, device), None
        if name == "network" and seconds[name] is not None and run.model.attention_kind == "blockwise":
            with key_blocks_written_out():  # a fresh program, traced with the key-block loops written out
                unrolled, unrolled_args = sampling_program(run, mesh)
                seconds[name] = cost_model_seconds(unrolled.lower(*unrolled_args).compile())
        report[f"eval_{name}_memory_gb"] = memory.total / 1e9
        report[f"eval_{name}_fits"] = memory.fits
        report[f"eval_{name}_ms"] = None if seconds[name] is None else 1000 * seconds[name]
    batches = math.ceil(run.eval.num_samples / run.eval.batch_size)
    per_batch = (None if None in seconds.values() or not decode_and_embed else
                 run.eval.sampling_steps * seconds["network"] + sum(v for k, v in seconds.items() if k != "network"))
    return {**report, "eval_batch": run.eval.batch_size, "eval_samples": run.eval.num_samples,
            "eval_sampling_steps": run.eval.sampling_steps, "eval_cfg_scale": run.eval.cfg_scale,
            "eval_minutes": None if per_batch is None else batches * per_batch / 60}


def compile_report(run: RunConfig, mesh, target: str, cost_model: bool = True, decode_and_embed: bool = True) -> dict:
    """Memory, FLOPs and cost-model time per device of the run's training step (and of one sampling
    evaluation) compiled for the mesh, as one JSON-ready dict."""
    from dit.bench import peak_flops
    from dit.objectives import make_objective
    from dit.train import accumulation_choices, compile_step, compile_training, training_program

    objective = make_objective(run)
    devices = mesh.devices.size
    device = mesh.devices.flat[0]
    if run.train.batch_size % devices:
        raise UserError(f"train.batch_size={run.train.batch_size} does not split over {devices} devices; use a "
                        f"multiple of {devices}.")
    compiled, refusal = None, None
    try:
        compiled = (compile_training(run, objective, mesh) if run.train.grad_accum == "auto"
                    else compile_step(run, objective, mesh, run.train.grad_accum))
        grad_accum, memory = compiled.grad_accum, compiled.memory
    except DoesNotFit as error:
        refusal = error
        grad_accum = accumulation_choices(run, devices)[-1]
        jitted, args = training_program(run, objective, mesh, grad_accum)
        memory = _refused(error, jitted, args, device)
    jitted, args = training_program(run, objective, mesh, grad_accum)
    flops = program_flops(jitted, args, devices)
    scanned = run.model.blocks_scanned_on(device.platform)
    timed = None
    if cost_model and compiled is not None and cost_model_seconds(compiled.step) is not None:
        if scanned or grad_accum > 1 or run.model.attention_kind == "blockwise":
            with key_blocks_written_out():
                unrolled, unrolled_args = training_program(written_out(run), objective, mesh, grad_accum, unroll=True)
                timed = unrolled.lower(*unrolled_args).compile()
        else:  # already written out: the program that runs is the one timed
            timed = compiled.step
    seconds = None if timed is None else cost_model_seconds(timed)
    peak = peak_flops(device.device_kind, getattr(device, "num_cores", 1))
    evaluation = evaluation_report(run, mesh, cost_model, decode_and_embed)
    gb = lambda b: None if b is None else b / 1e9
    return {
        "target": target, "device_kind": device.device_kind, "devices": devices, "variant": run.variant,
        "preset": run.preset, "dtype": run.model.dtype, "global_batch": run.train.batch_size,
        "per_device_batch": run.train.batch_size // devices, "grad_accum": grad_accum,
        "grad_accum_setting": run.train.grad_accum, "remat": run.model.remat,
        "attention": run.model.attention_kind, "scan_blocks": run.model.scan_blocks,
        "blocks": "scanned" if scanned else "written out",
        "memory_gb": gb(memory.total), "arguments_gb": gb(memory.arguments), "temporaries_gb": gb(memory.temporaries),
        "outputs_gb": gb(memory.outputs), "capacity_gb": gb(memory.capacity),
        "fits": refusal is None and memory.fits, "headroom": memory.headroom,
        "refused": None if refusal is None else str(refusal),
        "flops_per_step": flops,
        "cost_model_ms": None if seconds is None else 1000 * seconds,
        "cost_model_gb_moved": None if seconds is None else cost_model_bytes(timed) / 1e9,
        "img_per_s": None if seconds is None else run.train.batch_size / seconds,
        "mfu": None if seconds is None or peak is None else flops / seconds / peak,
        "projected_run_hours": None if seconds is None else run.train.steps * seconds / 3600,
        "steps": run.train.steps,
        "sample_batch": run.eval.batch_size, "sample_memory_gb": evaluation["eval_network_memory_gb"],
        **evaluation,
    }
