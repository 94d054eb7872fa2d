"""The training loop: one jitted, data-parallel step with donated buffers, EMA, checkpoints, exact resume.

The loop reads results back from the device only when it logs or saves, so steps queue up on the
accelerator. Randomness of step s comes from fold_in(run key, s): a resumed run draws the same
timesteps, noise and label dropout as an uninterrupted one, and with the data iterator state saved
in the checkpoint, it continues bit for bit.

`build_training` compiles the step and places the initial state; `train` runs the loop on them. Neither
knows about run directories beyond the files training makes (checkpoints, metrics.jsonl, summary.json):
`dit.run.train_run` checks the directory, holds its lock and writes config.json.
"""

from __future__ import annotations

import hashlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from dit.batches import Batch, BatchFormat, BatchSource, Prefetch, latents_from_batch
from dit.checkpoint import Checkpoints
from dit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, to_dict
from dit.distributed import from_process_zero, wait_for_all_processes
from dit.errors import UserError
from dit.memory import DoesNotFit, StepMemory
from dit.mesh import (BATCH_AXIS, batch_sharded, data_mesh, global_batch, replicated,
                      split_over_devices, to_host)
from dit.model import DiT
from dit.objectives import Objective
from dit.repa import RepaProjector, repa_loss
from dit.files import write_json_atomic
from dit.rundir import METRICS, SUMMARY, append_metrics, read_metrics

FP16_INITIAL_SCALE = 2.0**15
FP16_GROWTH_INTERVAL = 2000  # finite steps before the loss scale doubles


class TrainingDiverged(UserError):
    exit_code = 1


def create_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with optional linear warmup, constant or cosine schedule, and global-norm clipping."""
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps - cfg.warmup_steps, 1))
    else:
        main = optax.constant_schedule(cfg.lr)
    schedule = main
    if cfg.warmup_steps:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), main],
                                        [cfg.warmup_steps])
    optimizer = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    # Clipping is always in the chain (at an infinite norm when off), so the optimizer state has one shape
    # whatever train.grad_clip is, and a diverged run can resume with clipping turned on.
    clip = optax.clip_by_global_norm(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    return optax.chain(clip, optimizer), schedule


def repa_projector(model_cfg: ModelConfig, train_cfg: TrainConfig, key=0) -> RepaProjector:
    """REPA's training-only projector from the model's width to the target features' (train.repa_*)."""
    return RepaProjector(model_cfg.hidden_size, train_cfg.repa_target_dim, train_cfg.repa_projector_dim,
                         rngs=nnx.Rngs(key), dtype=model_cfg.dtype)


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, optimizer: optax.GradientTransformation):
    """The model's graph and the train state: a dict of arrays, the unit that is stepped and saved.

    With REPA (train.repa_weight > 0) the state also holds the projector, which trains with the model (one
    optimizer over both: the optimizer state is then that of {"model": ..., "projector": ...}) but is not
    part of it: the EMA, samples and the parameter budget are the model's alone."""
    graphdef, params = nnx.split(DiT(model_cfg, rngs=nnx.Rngs(train_cfg.seed)))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema": jax.tree.map(jnp.copy, params),  # DiT's EMA starts as a copy of the initial weights
        "opt_state": optimizer.init(params),
        "rng": jax.random.fold_in(jax.random.PRNGKey(train_cfg.seed), 1),  # raw uint32 key: saveable
        "loss_scale": jnp.asarray(FP16_INITIAL_SCALE if model_cfg.dtype == "float16" else 1.0, jnp.float32),
        "finite_steps": jnp.zeros((), jnp.int32),
    }
    if train_cfg.repa_weight:
        # Its own stream (3) of the seed: the model's initial weights are those of a run without REPA.
        projector = nnx.state(repa_projector(model_cfg, train_cfg, jax.random.fold_in(jax.random.PRNGKey(train_cfg.seed), 3)))
        state["projector"] = projector
        state["opt_state"] = optimizer.init({"model": params, "projector": projector})
    return graphdef, state


# The parts of the state split over the devices with train.split_state (ZeRO stage 3): each device
# updates its 1/n of the weights, the EMA and the optimizer's moments, which divides the update's memory
# traffic (the same on every device when all is replicated) and this memory by the device count; each
# step gathers the weights for the forward pass, in the compute dtype (`gathered_weights`).
SPLIT_PARTS = ("params", "ema", "opt_state")
# The weights that every layer of the model casts to the compute dtype before its product (tests/test_train.py
# checks it): cast before the gather rather than after it, they are gathered in half the bytes in bfloat16.
PRODUCT_WEIGHTS = ("kernel", "bias")


def gathered_weights(params, mesh, compute_dtype: str):
    """The weights of a split state whole on every device, the products' weights cast to the compute dtype
    first. Measured 2026-12-07 (TPU v3-8 cost model, DiT-S/2 in bfloat16, batch 256): the step 31.71 ->
    31.02 ms and 1.67 -> 1.61 GB per core, where the weights were replicated in the state and gathered in
    float32 after each update (patch1, its gradient then unrounded: 262.0 -> 261.3 ms, but 5.45 -> 7.00 GB;
    docs/commands.md)."""
    whole = replicated(mesh)

    def gather(path, weight):
        names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        if names and names[-1] in PRODUCT_WEIGHTS:
            weight = weight.astype(compute_dtype)
        return jax.lax.with_sharding_constraint(weight, whole)

    return jax.tree_util.tree_map_with_path(gather, params)


def state_shardings(state: dict, mesh, train_cfg: TrainConfig) -> dict:
    """Where each leaf of a train state (arrays or shapes) lives on the mesh: with train.split_state,
    SPLIT_PARTS's leaves split along an axis that divides over the devices; the rest replicated."""
    split = train_cfg.state_split_on(mesh.devices.flat[0].platform)
    return {key: jax.tree.map(lambda a: split_over_devices(mesh, a.shape) if split and key in SPLIT_PARTS
                              else replicated(mesh), value)
            for key, value in state.items()}


def microbatches(tree, k: int, mesh):
    """(B, ...) leaves -> (k, B/k, ...): microbatch i holds rows i, i+k, i+2k, ... of the batch, so each
    device's rows stay on that device and every microbatch is spread over all devices."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, BATCH_AXIS))
    split = lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(split(a), sharding), tree)


def make_train_step(graphdef, objective: Objective, optimizer, schedule, train_cfg: TrainConfig,
                    dynamic_loss_scale: bool, mesh, state_sharding: dict, grad_accum: int = 1,
                    unroll: bool = False, batch_format: BatchFormat = BatchFormat(), projector_def=None,
                    repa_block: int = 0, compute_dtype: str = "float32") -> Callable:
    """The jitted step (state, Batch) -> (state, metrics); the state's buffers are donated and keep
    `state_sharding` (`state_shardings`).

    The step turns the batch into latents itself (the flip and the posterior sample, from train.seed and
    each record's ids: `latents_from_batch`), so the host only reads. With grad_accum = k the batch is k
    microbatches whose gradients are averaged before the one optimizer and EMA update. Latents, time,
    noise and label dropout are drawn for the whole batch first, so the update is that of k = 1 up to
    float32 rounding, whatever k. `unroll` writes the microbatch loop out (for XLA's cost model, which
    counts a loop body once). With a `projector_def` (REPA), the loss adds train.repa_weight x REPA's
    alignment of the tokens after block `repa_block`, through the projector, with the batch's targets.
    """

    split = any(not sharding.is_fully_replicated for sharding in jax.tree.leaves(state_sharding["params"]))
    weights = (lambda params: gathered_weights(params, mesh, compute_dtype)) if split else (lambda params: params)

    def losses(trainable, microbatch):
        """(per-example objective loss, noise level, REPA alignment loss or 0) of a microbatch."""
        x, labels, noise, targets = microbatch
        if projector_def is None:
            per_example, t_frac = objective.loss(nnx.merge(graphdef, weights(trainable)), x, labels, noise)
            return per_example, t_frac, jnp.zeros((), jnp.float32)
        model, tokens = nnx.merge(graphdef, weights(trainable["model"])), []

        def model_fn(x, t, y):  # the objective calls the model once; REPA needs its tokens after block k too
            out, after = model(x, t, y, tokens_after=repa_block)
            tokens.append(after)
            return out

        per_example, t_frac = objective.loss(model_fn, x, labels, noise)
        projected = nnx.merge(projector_def, trainable["projector"])(tokens[0])
        return per_example, t_frac, repa_loss(projected, targets)

    def step(state, batch):
        x, y = latents_from_batch(batch, train_cfg.seed, batch_format.scale_factor)
        key_objective, key_dropout = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
        scale = state["loss_scale"]
        noise = objective.draw(key_objective, x)
        labels = nnx.merge(graphdef, state["params"]).y_embedder.drop(y, key_dropout)
        trainable = state["params"] if projector_def is None else {"model": state["params"],
                                                                   "projector": state["projector"]}

        def loss_fn(trainable, microbatch):
            per_example, t_frac, alignment = losses(trainable, microbatch)
            return (per_example.mean() + train_cfg.repa_weight * alignment) * scale, (per_example, t_frac, alignment)

        gradient = jax.grad(loss_fn, has_aux=True)
        whole = (x, labels, noise, batch.repa)
        if grad_accum == 1:
            grads, (per_example, t_frac, alignment) = gradient(trainable, whole)
        else:
            def accumulate(total, microbatch):
                grads, aux = gradient(trainable, microbatch)
                return jax.tree.map(jnp.add, total, grads), aux

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            grads, (per_example, t_frac, alignment) = jax.lax.scan(accumulate, zeros,
                                                                   microbatches(whole, grad_accum, mesh),
                                                                   unroll=grad_accum if unroll else 1)
            # Examples come back grouped by microbatch; the loss and its quartiles are sums, so order is moot.
            per_example, t_frac = per_example.reshape(-1), t_frac.reshape(-1)
        loss = per_example.mean()
        grads = jax.tree.map(lambda g: g / (scale * grad_accum), grads)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = optimizer.update(grads, state["opt_state"], trainable)
        trained = optax.apply_updates(trainable, updates)
        if dynamic_loss_scale:
            # float16: skip a step whose gradients overflowed (keep the weights and the optimizer state).
            finite = jnp.isfinite(grad_norm)
            keep = lambda a, b: jax.tree.map(lambda u, v: jnp.where(finite, u, v), a, b)
            trained, opt_state = keep(trained, trainable), keep(opt_state, state["opt_state"])
        params = trained if projector_def is None else trained["model"]
        decay = train_cfg.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
        if dynamic_loss_scale:
            ema = keep(ema, state["ema"])
        new = dict(state, step=state["step"] + 1, params=params, ema=ema, opt_state=opt_state)
        if projector_def is not None:
            new["projector"] = trained["projector"]
        if dynamic_loss_scale:
            # Halve the scale after an overflow; double it after a run of finite steps.
            run = jnp.where(finite, state["finite_steps"] + 1, 0)
            grow = run >= FP16_GROWTH_INTERVAL
            new["loss_scale"] = jnp.where(finite, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1.0))
            new["finite_steps"] = jnp.where(grow, 0, run)
        quartile = jnp.clip((t_frac * 4).astype(jnp.int32), 0, 3)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "loss_scale": scale,
            "quartile_sum": jax.ops.segment_sum(per_example, quartile, 4),
            "quartile_count": jax.ops.segment_sum(jnp.ones_like(per_example), quartile, 4),
        }
        if projector_def is not None:
            metrics["repa_loss"] = jnp.mean(alignment)
        return new, metrics

    return jax.jit(step, in_shardings=(state_sharding, batch_sharded(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def default_batch_format(data: DataConfig) -> BatchFormat:
    """The batches a data config implies, for compiling a step without its data (dit.aot): images flipped
    as they are read, a cache as `extract` writes it by default (float16, both flips; its scale factor
    does not change the program's cost), or, with no data named, latents held in memory."""
    if data.images:
        return BatchFormat(dtype="float32", flip=False)
    if data.cache:
        return BatchFormat(dtype="float16", flip=data.flip)
    return BatchFormat()


def abstract_batch(run: RunConfig, mesh, batch_size: int | None = None,
                   batch_format: BatchFormat | None = None) -> Batch:
    """ShapeDtypeStructs of one global training batch (a Batch), sharded over the mesh."""
    m, sharding = run.model, batch_sharded(mesh)
    fmt = batch_format or default_batch_format(run.data)
    n = batch_size or run.train.batch_size
    latents = (n, 2 if fmt.flip else 1, m.input_size, m.input_size, m.in_channels)
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    targets = None
    if run.train.repa_weight:  # a source's shape, else the one a cache for this model would hold
        targets = rows((n, *(fmt.repa_shape or (m.num_tokens, run.train.repa_target_dim))), jnp.int8)
    return Batch(mean=rows(latents, fmt.dtype), std=rows(latents, fmt.dtype), label=rows((n,), jnp.int32),
                 epoch=rows((n,), jnp.int32), record=rows((n,), jnp.int32), repa=targets)


@dataclass(frozen=True)
class CompiledStep:
    """The training step compiled for a mesh (call it as step(state, batch); it also has cost_analysis()),
    the microbatch count it was built with and its memory per device."""

    step: jax.stages.Compiled
    grad_accum: int
    memory: StepMemory


def accumulation_choices(run: RunConfig, devices: int) -> list[int]:
    """The microbatch counts to try: the configured one, or for auto every k that splits each device's
    share of the batch evenly, fewest first."""
    if run.train.grad_accum != "auto":
        return [run.train.grad_accum]
    per_device = run.train.batch_size // devices
    return [k for k in range(1, per_device + 1) if per_device % k == 0]


def training_program(run: RunConfig, objective: Objective, mesh, grad_accum: int, unroll: bool = False,
                     batch_format: BatchFormat | None = None):
    """The jitted step of a run for `grad_accum` microbatches and the sharded shapes of its arguments;
    the batches are those of `batch_format` (default: what run.data implies)."""
    batch_format = batch_format or default_batch_format(run.data)
    optimizer, schedule = create_optimizer(run.train)
    graphdef = nnx.split(nnx.eval_shape(lambda: DiT(run.model, rngs=nnx.Rngs(0))))[0]
    shapes = jax.eval_shape(lambda: init_state(run.model, run.train, optimizer)[1])
    state_sharding = state_shardings(shapes, mesh, run.train)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                                  state_sharding)
    projector_def = None
    if run.train.repa_weight:
        projector_def = nnx.split(nnx.eval_shape(lambda: repa_projector(run.model, run.train)))[0]
    jitted = make_train_step(graphdef, objective, optimizer, schedule, run.train, mesh=mesh,
                             state_sharding=state_sharding, grad_accum=grad_accum,
                             dynamic_loss_scale=run.model.dtype == "float16", unroll=unroll,
                             batch_format=batch_format, projector_def=projector_def, repa_block=run.repa_block,
                             compute_dtype=run.model.dtype)
    return jitted, (abstract_state, abstract_batch(run, mesh, batch_format=batch_format))


def compile_step(run: RunConfig, objective: Objective, mesh, grad_accum: int,
                 batch_format: BatchFormat | None = None) -> CompiledStep:
    """The step compiled ahead of time from shapes alone (no device memory is taken); raises DoesNotFit
    with XLA's words where XLA refuses a program larger than the device (TPU)."""
    jitted, args = training_program(run, objective, mesh, grad_accum, batch_format=batch_format)
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise DoesNotFit(f"grad_accum={grad_accum}: {str(error).strip().splitlines()[0][:240]}") from None
    return CompiledStep(compiled, grad_accum, StepMemory.of(compiled, mesh.devices.flat[0]))


def compile_training(run: RunConfig, objective: Objective, mesh,
                     batch_format: BatchFormat | None = None) -> CompiledStep:
    """The step compiled for the mesh. train.grad_accum=auto takes the fewest microbatches whose step
    leaves the memory headroom free on each device (failing that, the fewest that fit at all). A step
    that does not fit raises DoesNotFit with the numbers and the fixes."""
    device = mesh.devices.flat[0]
    fitting, tried = [], []
    for k in accumulation_choices(run, mesh.devices.size):
        try:
            compiled = compile_step(run, objective, mesh, k, batch_format)
        except DoesNotFit as refusal:
            tried.append(str(refusal))
            continue
        if compiled.memory.fits_with_headroom:
            return compiled
        if compiled.memory.fits:
            fitting.append(compiled)
        tried.append(f"grad_accum={k}: {compiled.memory.describe()}")
    if fitting:
        return fitting[0]
    per_device = run.train.batch_size // mesh.devices.size
    raise DoesNotFit(
        f"the training step of {run.variant} at global batch {run.train.batch_size} ({per_device} per device, "
        f"{run.model.dtype}, remat {run.model.remat}, attention {run.model.attention_kind}) does not fit one "
        f"{device.device_kind}: {'; '.join(tried)}. Set train.grad_accum=auto (or a larger k) to split the batch "
        f"into microbatches, model.remat=dots or block to recompute activations, or a smaller train.batch_size; "
        f"`python -m dit.bench compile` shows the memory of each choice."
    )


def build_training(run: RunConfig, objective: Objective, mesh,
                   batch_format: BatchFormat | None = None) -> tuple[object, dict, CompiledStep]:
    """The model graph, the initial state (placed by `state_shardings`) and the compiled step of a run, for
    batches of `batch_format` (a source's; default: what run.data implies)."""
    compiled = compile_training(run, objective, mesh, batch_format)  # before any device memory is taken
    optimizer, _ = create_optimizer(run.train)
    graphdef, state = init_state(run.model, run.train, optimizer)
    wait_for_all_processes("dit-training-compiled")  # the placement below is the first collective
    return graphdef, jax.device_put(state, state_shardings(state, mesh, run.train)), compiled


def params_sha256(params) -> str:
    """SHA-256 over parameters: leaves in the order of their sorted '/'-joined key paths, each as
    little-endian float32 bytes in C order (the names themselves are not hashed)."""
    leaves = jax.tree_util.tree_flatten_with_path(to_host(params))[0]
    named = sorted(("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf)
                   for path, leaf in leaves)
    digest = hashlib.sha256()
    for _, leaf in named:
        digest.update(np.ascontiguousarray(leaf, dtype="<f4").tobytes())
    return digest.hexdigest()


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so a preempted run saves before it exits."""

    def __enter__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """True on every process if any process was asked to stop (a collective when multi-process)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _start_memory_tracking() -> None:
    """On GPUs, jax-smi's thread saves a device memory profile every second for `jax-smi` to show."""
    global _memory_tracking
    if not _memory_tracking and jax.default_backend() == "gpu":
        from jax_smi import initialise_tracking
        initialise_tracking()
        _memory_tracking = True


_memory_tracking = False


def _tensorboard_writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard=true needs tensorboardX: pip install -e '.[tensorboard]' (or "
                        "leave train.tensorboard off; metrics.jsonl holds the same numbers).") from None
    return SummaryWriter(str(workdir / "tensorboard"))


@dataclass
class _Log:
    """Device metrics since the last log; fetched (one device sync) only when written."""

    path: Path | None
    global_batch: int
    tensorboard: object = None  # a tensorboardX SummaryWriter, or None

    def __post_init__(self):
        self.pending: list[dict] = []
        self.timed_steps = 0
        self.since = time.perf_counter()
        self.compile_s: float | None = None
        self.written = False

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)
        if self.compile_s is None:
            # The first step of a session compiles; time it apart so img/s measures steady training.
            jax.block_until_ready(metrics)
            self.compile_s = time.perf_counter() - self.since
            self.since = time.perf_counter()
        else:
            self.timed_steps += 1

    def check_finite(self, first_step: int, last_good: int | None, workdir: Path) -> None:
        self.pending = to_host(self.pending)  # one fetch; `write` then finds them on the host
        losses = np.asarray([m["loss"] for m in self.pending])
        if not np.all(np.isfinite(losses)):
            bad = first_step + int(np.argmin(np.isfinite(losses)))
            kept = f"the last good checkpoint (step {last_good}) is kept in {workdir}" if last_good else \
                "no checkpoint was saved before it (a resume starts it again from step 0)"
            raise TrainingDiverged(
                f"the loss became NaN or Inf at step {bad}; training stopped and {kept}. Resume with a lower "
                f"learning rate or with clipping, which a resume may change: `python ablations/run.py --resume "
                f"--workdir {workdir} --set train.lr=LOWER --set train.grad_clip=1.0` (or use bfloat16 rather "
                f"than float16 in a new run)."
            )

    def exclude(self, seconds: float) -> None:
        """Time spent on something else (evaluation) does not count against training throughput."""
        self.since += seconds

    def write(self, step: int, extra: dict | None = None) -> dict:
        fetched = to_host(self.pending)
        elapsed = time.perf_counter() - self.since
        n = max(self.timed_steps, 1)
        qsum = np.sum([m["quartile_sum"] for m in fetched], axis=0)
        qcount = np.sum([m["quartile_count"] for m in fetched], axis=0)
        record = {
            "step": step,
            "loss": float(np.mean([m["loss"] for m in fetched])),
            **{f"loss_q{i}": float(qsum[i] / qcount[i]) if qcount[i] else None for i in range(4)},
            "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            **({"repa_loss": float(np.mean([m["repa_loss"] for m in fetched]))} if "repa_loss" in fetched[-1] else {}),
            "lr": float(fetched[-1]["lr"]),
            "img_per_s": n * self.global_batch / elapsed,
            "step_ms": 1000 * elapsed / n,
        }
        if self.compile_s is not None and not self.written:
            record["compile_s"] = self.compile_s
            self.written = True
        record.update(extra or {})
        if float(fetched[-1]["loss_scale"]) != 1.0:
            record["loss_scale"] = float(fetched[-1]["loss_scale"])
        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_in_use" in stats:
            record["memory_gb"] = stats["bytes_in_use"] / 1e9
            record["peak_memory_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
        self._append(record, "train")
        self.pending, self.since, self.timed_steps = [], time.perf_counter(), 0
        return record

    def write_evaluation(self, step: int, evaluated: dict) -> dict:
        """The evaluation of `step` as a line of its own: its presence marks the evaluation as done."""
        record = {"step": step, "evaluated": True, **evaluated}
        self._append(record, "eval")
        return record

    def _append(self, record: dict, section: str) -> None:
        if self.path is not None:
            append_metrics(self.path, record)
        if self.tensorboard is not None:
            for name, value in record.items():
                if name not in ("step", "evaluated") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{section}/{name}", value, record["step"])
            self.tensorboard.flush()


def is_eval_step(run: RunConfig, step: int) -> bool:
    return step > 0 and (step % run.eval.every == 0 or step == run.train.steps)


def _pending_evaluation(run: RunConfig, workdir: Path, step: int, lead: bool) -> bool:
    """True when `step` should have an evaluation that metrics.jsonl lacks (a run killed while evaluating:
    the step's checkpoint is saved before its evaluation). Process 0 reads the file and tells the rest."""
    pending = lead and is_eval_step(run, step) and not any(
        r["step"] == step and r.get("evaluated") for r in read_metrics(workdir / METRICS))
    return bool(from_process_zero(pending))


def _agreed_resume_step(latest: int | None, workdir: Path) -> int:
    """The step every process resumes from; processes that found different latest steps (local
    checkpoint directories out of step) stop with an error instead of training apart."""
    steps = [-1 if latest is None else latest]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        steps = [int(s) for s in multihost_utils.process_allgather(np.asarray(steps[0]))]
    if len(set(steps)) > 1:
        found = ", ".join(f"process {i}: {'none' if s < 0 else s}" for i, s in enumerate(steps))
        raise UserError(
            f"--resume: the processes found different latest checkpoints ({found}). Copy the newest "
            f"common checkpoint into every process's directory under {workdir / 'checkpoints'} (or delete "
            f"the newer ones) so that all processes resume from the same step."
        )
    return steps[0]


def _restore(checkpoints: Checkpoints, state, workdir: Path, lead: bool):
    """The state and data position of the newest intact checkpoint (every process agreeing on its step),
    damaged newer ones moved aside with a warning; the initial state and None when none is left."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)

    def agree(found: int | None) -> int | None:
        agreed = _agreed_resume_step(found, workdir)
        return None if agreed < 0 else agreed

    step, restored, meta, skipped = checkpoints.restore_newest_intact(abstract, agree=agree)
    if skipped and (checkpoints.local or lead):
        aside = checkpoints.set_aside([s for s, _ in skipped])
        for bad, problem in skipped:
            print(f"warning: checkpoint step {bad} is damaged ({problem}); skipped it and moved it to {aside}")
    if jax.process_count() > 1:  # every process, skipped or not: the moves are done before anyone saves
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("checkpoints set aside")
        checkpoints.manager.reload()
    if step is None:
        if lead:
            print(f"resuming {workdir}: no intact checkpoint, so training starts again from step 0")
        return state, None
    return restored, meta["data"]


def train(run: RunConfig, workdir: Path, source: BatchSource, state: dict, compiled: CompiledStep, *,
          resume: bool = False, progress: bool = True,
          evaluate: Callable[[int, object], dict] | None = None,
          on_resume: Callable[[int], None] | None = None) -> dict:
    """Trains `state` with its compiled step (from `build_training`: the model's graph, the objective and the
    optimizer are in the step) on `source` for run.train; returns the summary, also written to summary.json.

    It writes what training makes in `workdir`: checkpoints (every process takes part in the saves),
    and on process 0 metrics.jsonl and summary.json; the run directory's config.json and lock belong to
    the caller (`dit.run.train_run`). SIGTERM saves a checkpoint and returns with summary["preempted"] =
    True. With `resume`, it continues from the newest intact checkpoint (calling `on_resume(step)`).
    `evaluate(step, ema_params) -> metrics` runs every `eval.every` steps and at the last step (on every
    process); each evaluation is a line of its own in metrics.jsonl, after the step's checkpoint, so an
    evaluation cut off by a crash is run again on resume.
    """
    cfg = run.train
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    mesh = data_mesh()
    train_step = compiled.step
    if lead and progress:
        print(f"training step compiled: grad_accum {compiled.grad_accum}, {compiled.memory.describe()}")
    checkpoints = Checkpoints(workdir / "checkpoints", cfg)
    last_saved = None
    if resume:
        state, data_state = _restore(checkpoints, state, workdir, lead)
        if data_state is not None:
            source.set_state(data_state)
    step = int(to_host(state["step"]))
    if step > 0:
        last_saved = step
    if resume and on_resume is not None:
        on_resume(step)
    if cfg.jax_smi:
        _start_memory_tracking()
    writer = _tensorboard_writer(workdir) if cfg.tensorboard and lead else None
    log = _Log(workdir / METRICS if lead else None, cfg.batch_size, writer)
    first_unchecked = step + 1
    last_record: dict = {}
    preempted = False
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and lead), desc="train", unit="step")
    try:
        if resume and evaluate is not None and _pending_evaluation(run, workdir, step, lead):
            # Killed while evaluating this step: its checkpoint holds the EMA the evaluation needs.
            last_record = log.write_evaluation(step, evaluate(step, state["ema"]))
        # A thread reads the next batches and puts them on the devices while this step runs; checkpoints
        # take `batches.get_state()`: the position after the batches trained on, not those read ahead.
        with _Preemption() as preemption, \
                Prefetch(source, lambda batch: global_batch(mesh, batch), cfg.steps - step) as batches:
            while step < cfg.steps:
                state, metrics = train_step(state, batches.next())
                step += 1
                log.add(metrics)
                bar.update(1)
                at_eval = evaluate is not None and is_eval_step(run, step)
                at_log = step % cfg.log_every == 0 or step == cfg.steps or at_eval
                # An evaluation step is always saved first, so a crash during the evaluation can redo it.
                at_save = step % cfg.ckpt_every == 0 or step == cfg.steps or at_eval
                stop = preemption.agreed() if (jax.process_count() == 1 or at_log) else False
                if at_log or at_save or stop:
                    log.check_finite(first_unchecked, last_saved, workdir)  # never save a diverged state
                if at_save or stop:
                    checkpoints.save(step, state, {"data": batches.get_state(), "config": to_dict(run)})
                    last_saved = step
                if at_log or stop:
                    last_record = log.write(step)
                    first_unchecked = step + 1
                    bar.set_postfix(loss=f"{last_record['loss']:.4f}", img_s=f"{last_record['img_per_s']:.1f}")
                    checkpoints.seal_finished()
                if at_eval:
                    started = time.perf_counter()
                    last_record = log.write_evaluation(step, evaluate(step, state["ema"]))
                    log.exclude(time.perf_counter() - started)
                if stop:
                    preempted = True
                    break
    finally:
        # Whatever stops the loop, checkpoints already started are finished, never left half-written.
        bar.close()
        if writer is not None:
            writer.close()
        checkpoints.wait()
        checkpoints.close()
    if lead:  # the step's lines merged: its training metrics and its evaluation
        last_record = ([r for r in read_metrics(workdir / METRICS) if r["step"] == step] or [last_record])[-1]
    summary = {"final_step": step, "preempted": preempted, "params_sha256": params_sha256(state["ema"]),
               "last_metrics": last_record}
    if lead and not preempted:
        write_json_atomic(workdir / SUMMARY, summary)
    return summary
