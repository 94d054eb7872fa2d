"""The training loop: learning, exact resume, preemption, NaN guard, run-directory safety, sharding."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ablations.presets import smoke
from dit.batches import ArrayBatches, Batch, BatchFormat, latent_batch
from dit.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from dit.errors import UserError
from dit.model import DiT
from dit.mesh import data_mesh, global_batch
from dit.objectives import make_objective
from dit.mesh import to_host
from dit.rundir import read_metrics
from dit.run import restore_ema, train_run
from dit.train import TrainingDiverged, build_training, create_optimizer, gathered_weights, params_sha256
from tests.helpers import batch, randomized
from variants.registry import REGISTERED, resolve

MODEL = ModelConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=4)


def run_config(steps=8, objective="ddpm", **train):
    return RunConfig(model=MODEL, train=TrainConfig(steps=steps, batch_size=8, ckpt_every=4, log_every=2,
                                                    objective=objective, **train))


def toy_data(n=64, seed=0):
    """Four classes, each a constant latent of its own value: easy to learn, so the loss must fall."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = np.broadcast_to((y[:, None, None, None] - 1.5) / 1.5, (n, 8, 8, 4)).astype(np.float32)
    return x + 0.05 * rng.normal(size=x.shape).astype(np.float32), y


class Interrupt(Exception):
    pass


class Source(ArrayBatches):
    """ArrayBatches that can raise or send SIGTERM to this process when a given batch is requested."""

    def __init__(self, *args, crash_at=None, sigterm_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.crash_at, self.sigterm_at = 0, crash_at, sigterm_at

    def next(self):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Interrupt
        if self.calls == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().next()


def source(**kwargs):
    x, y = toy_data()
    return Source(x, y, 8, seed=0, **kwargs)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_writes_run_files_and_loss_falls(tmp_path, objective):
    run = run_config(steps=150, objective=objective, lr=1e-3)
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, log_every=50, ckpt_every=150))
    summary = train_run(run, tmp_path / "run", source(), make_objective(run), progress=False)
    assert summary["final_step"] == 150 and len(summary["params_sha256"]) == 64
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150]
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert {"loss", "loss_q0", "loss_q3", "grad_norm", "lr", "img_per_s", "step_ms"} <= set(records[-1])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["objective"] == objective
    trained = nnx.state(DiT(run.model, rngs=nnx.Rngs(0)), nnx.Param)  # the parameters of the model trained
    assert config["model_params"] == sum(leaf.size for leaf in jax.tree.leaves(trained))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_step"] == 150


def test_crash_and_resume_is_bitwise_identical(tmp_path):
    # The state split over the eight devices (auto keeps it whole on CPUs): checkpoints are saved and
    # restored split, and an evaluation restores the EMA whole.
    run = run_config(steps=8, split_state=True)
    straight = train_run(run, tmp_path / "a", source(), make_objective(run), progress=False)
    with pytest.raises(Interrupt):
        train_run(run, tmp_path / "b", source(crash_at=7), make_objective(run), progress=False)
    resumed = train_run(run, tmp_path / "b", source(), make_objective(run), resume=True, progress=False)
    assert resumed["final_step"] == 8
    assert resumed["params_sha256"] == straight["params_sha256"]
    step, _, ema = restore_ema(tmp_path / "b", run, None)
    assert step == 8 and all(a.is_fully_replicated for a in jax.tree.leaves(ema))
    assert params_sha256(ema) == resumed["params_sha256"]


def test_sigterm_saves_and_exits_then_resumes_identically(tmp_path):
    run = run_config(steps=8)
    straight = train_run(run, tmp_path / "a", source(), make_objective(run), progress=False)
    stopped = train_run(run, tmp_path / "b", source(sigterm_at=3), make_objective(run), progress=False)
    # Batches are read ahead in a thread, so the signal comes while step 1, 2 or 3 runs.
    assert stopped["preempted"] and 1 <= stopped["final_step"] <= 3
    assert (tmp_path / "b" / "checkpoints" / str(stopped["final_step"])).is_dir()
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = train_run(run, tmp_path / "b", source(), make_objective(run), resume=True, progress=False)
    assert resumed["params_sha256"] == straight["params_sha256"]


def test_existing_run_directory_is_never_reused(tmp_path):
    run = run_config(steps=2)
    train_run(run, tmp_path / "run", source(), make_objective(run), progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(UserError, match="already exists"):
        train_run(run, tmp_path / "run", source(), make_objective(run), progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    with pytest.raises(UserError, match="no checkpoints"):
        train_run(run, tmp_path / "other", source(), make_objective(run), resume=True, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = run_config(steps=8)
    x, y = toy_data()
    x[:] = np.nan  # every batch poisons the loss from step 1 on ...
    good = train_run(run, tmp_path / "ok", source(), make_objective(run), progress=False)
    assert good["final_step"] == 8
    with pytest.raises(TrainingDiverged, match="NaN or Inf at step 1"):
        train_run(run, tmp_path / "bad", Source(x, y, 8, seed=0), make_objective(run), progress=False)
    assert not (tmp_path / "bad" / "checkpoints" / "4").exists()


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path):
    run = run_config(steps=8)
    straight = train_run(run, tmp_path / "a", source(), make_objective(run), progress=False)
    with pytest.raises(Interrupt):
        train_run(run, tmp_path / "b", source(crash_at=3), make_objective(run), progress=False)
    assert (tmp_path / "b" / "config.json").is_file() and not any((tmp_path / "b" / "checkpoints").iterdir())
    resumed = train_run(run, tmp_path / "b", source(), make_objective(run), resume=True, progress=False)
    assert resumed["final_step"] == 8 and resumed["params_sha256"] == straight["params_sha256"]


def test_a_diverged_run_resumes_with_clipping_turned_on(tmp_path):
    # A NaN before the first checkpoint; the resume changes train.grad_clip (the optimizer state keeps its
    # shape whatever the clip) and records the change in config.json.
    run = run_config(steps=4)
    x, y = toy_data()
    x[:] = np.nan
    with pytest.raises(TrainingDiverged, match="--set train.lr=LOWER --set train.grad_clip=1.0"):
        train_run(run, tmp_path / "run", Source(x, y, 8, seed=0), make_objective(run), progress=False)
    clipped = dataclasses.replace(run, train=dataclasses.replace(run.train, grad_clip=1.0))
    resumed = train_run(clipped, tmp_path / "run", source(), make_objective(clipped), resume=True, progress=False,
                        resume_changes={"train.grad_clip": [0.0, 1.0]})
    assert resumed["final_step"] == 4
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["grad_clip"] == 1.0
    assert config["resume_changes"] == [{"from_step": 0, "changes": {"train.grad_clip": {"was": 0.0, "now": 1.0}}}]


def test_a_damaged_newest_checkpoint_is_skipped_kept_aside_and_the_run_resumes_exactly(tmp_path, capsys):
    run = dataclasses.replace(run_config(steps=8), train=dataclasses.replace(run_config().train, ckpt_every=2))
    straight = train_run(run, tmp_path / "a", source(), make_objective(run), progress=False)
    with pytest.raises(Interrupt):
        train_run(run, tmp_path / "b", source(crash_at=8), make_objective(run), progress=False)
    newest = tmp_path / "b" / "checkpoints" / "6"
    data = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01  # one flipped bit: it would load silently without the seal
    data.write_bytes(bytes(flipped))
    resumed = train_run(run, tmp_path / "b", source(), make_objective(run), resume=True, progress=False)
    assert resumed["params_sha256"] == straight["params_sha256"]  # exact, from step 4
    assert "checkpoint step 6 is damaged" in capsys.readouterr().out
    assert [p.name.split("-")[0] for p in (tmp_path / "b" / "damaged_checkpoints").iterdir()] == ["6"]


HOLD_LOCK = """
import sys, time
from dit.rundir import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_of_a_run_directory_is_refused(tmp_path):
    import subprocess
    import sys
    run = run_config(steps=2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another process .* is writing the run directory"):
            train_run(run, tmp_path / "run", source(), make_objective(run), progress=False)
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_is_one_clear_error(tmp_path):
    import errno

    class FullDisk(Source):
        def next(self):
            if self.calls == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().next()

    x, y = toy_data()
    run = run_config(steps=8)
    with pytest.raises(UserError, match="the disk holding .* is full .* --resume --workdir"):
        train_run(run, tmp_path / "run", FullDisk(x, y, 8, seed=0), make_objective(run), progress=False)


def test_an_evaluation_cut_off_is_run_again_on_resume(tmp_path):
    run = dataclasses.replace(run_config(steps=8), eval=dataclasses.replace(RunConfig().eval, every=4))
    calls = []

    def evaluate(step, ema):
        calls.append(step)
        if calls == [4]:
            raise Interrupt  # the process dies during the evaluation of step 4 (its checkpoint is saved)
        return {"score": float(step)}

    with pytest.raises(Interrupt):
        train_run(run, tmp_path / "run", source(), make_objective(run), progress=False, evaluate=evaluate)
    summary = train_run(run, tmp_path / "run", source(), make_objective(run), resume=True, progress=False,
                        evaluate=evaluate)
    assert calls == [4, 4, 8]  # step 4 redone from its checkpoint, before training goes on
    evaluated = [r["step"] for r in read_metrics(tmp_path / "run") if r.get("evaluated")]
    assert evaluated == [4, 8] and summary["last_metrics"]["score"] == 8.0 and "loss" in summary["last_metrics"]
    # Resuming the finished run returns its summary and writes nothing.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    again = train_run(run, tmp_path / "run", source(), make_objective(run), resume=True, progress=False, evaluate=evaluate)
    assert again == json.loads((tmp_path / "run" / "summary.json").read_text()) and calls == [4, 4, 8]
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}


def test_one_device_and_eight_devices_give_the_same_step_with_the_update_split_over_devices():
    assert jax.device_count() == 8
    run = run_config(split_state=True)  # auto keeps the state whole on CPUs
    x, y = toy_data(8)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = data_mesh(devices)
        _, state, compiled = build_training(run, make_objective(run), mesh)
        step = compiled.step
        state, metrics = step(state, global_batch(mesh, latent_batch(x, y)))
        results.append(to_host((metrics["loss"], state["params"], state["ema"], state["opt_state"])))
    (loss1, *state1), (loss8, *state8) = results
    np.testing.assert_allclose(loss1, loss8, rtol=1e-5)  # only the order of the mean's sums differs
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # On eight devices each holds 1/8 of the weights, of the EMA and of the optimizer's moments.
    parts = (state["params"], state["ema"], state["opt_state"])
    split = [a for a in jax.tree.leaves(parts) if any(n % 8 == 0 for n in a.shape)]
    assert len(split) == 4 * len(jax.tree.leaves(state["params"]))  # weights, EMA, AdamW's mu and nu
    assert all(a.addressable_shards[0].data.size * 8 == a.size for a in split)


def test_the_weights_gathered_in_the_compute_dtype_give_the_same_forward():
    # gathered_weights casts the products' weights (PRODUCT_WEIGHTS) before the gather: that changes nothing
    # only if every layer casts them to the compute dtype anyway, which this checks for each registered variant.
    mesh = data_mesh(jax.devices()[:1])
    for name in REGISTERED:
        cfg = dataclasses.replace(smoke(RunConfig(model=resolve(name))).model, dtype="bfloat16")
        graphdef, params = nnx.split(randomized(cfg), nnx.Param)
        x, t, y = batch(cfg, n=2)
        forward = jax.jit(lambda params: nnx.merge(graphdef, params)(x, t, y))
        gathered = gathered_weights(params, mesh, "bfloat16")
        cast = [a for a, b in zip(jax.tree.leaves(gathered), jax.tree.leaves(params)) if a.dtype != b.dtype]
        assert cast and all(a.dtype == jnp.bfloat16 for a in cast), name
        np.testing.assert_array_equal(forward(gathered), forward(params), err_msg=name)


def test_optimizer_schedule_warmup_and_cosine():
    _, schedule = create_optimizer(TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="cosine"))
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0) and float(schedule(100)) == pytest.approx(0.0, abs=1e-6)


def test_float16_dynamic_loss_scale_skips_overflowing_steps():
    run = run_config()
    run = RunConfig(model=dataclasses.replace(MODEL, dtype="float16"), train=run.train)
    mesh = data_mesh(jax.devices()[:1])
    _, state, compiled = build_training(run, make_objective(run), mesh)
    step = compiled.step
    x, y = toy_data(8)
    before = to_host(state["params"])
    assert float(to_host(state["loss_scale"])) == 2.0**15
    state, _ = step(state, global_batch(mesh, latent_batch(x * 1e6, y)))  # float16 overflows: the step is skipped
    after = to_host(state)
    assert float(after["loss_scale"]) == 2.0**14
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after["params"])):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, global_batch(mesh, latent_batch(x, y)))
    after = to_host(state)
    assert np.isfinite(float(to_host(metrics["loss"]))) and float(after["loss_scale"]) == 2.0**14
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after["params"])))


def test_batch_that_does_not_split_over_devices_is_a_clear_error(tmp_path):
    run = RunConfig(model=MODEL, train=TrainConfig(steps=2, batch_size=12))  # 8 devices
    with pytest.raises(UserError, match="multiple of 8"):
        train_run(run, tmp_path / "run", source(), make_objective(run), progress=False)
    assert not (tmp_path / "run").exists()


def read_scalars(directory):
    """The scalars of TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in directory.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        while data:
            length = int.from_bytes(data[:8], "little")
            event = event_pb2.Event.FromString(data[12:12 + length])
            data = data[12 + length + 4:]
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
    pytest.importorskip("tensorboardX")
    run = run_config(steps=4, tensorboard=True)
    train_run(run, tmp_path / "run", source(), make_objective(run), progress=False)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in records] == [2, 4]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in records], rtol=1e-6)


def posterior_batch(x, y):
    """A batch as a cache sends it: both flips and a posterior std, so the step's own sampling is tested."""
    mean = np.stack([x, x[:, :, ::-1] + 0.1], 1)
    return Batch(mean, np.full_like(mean, 0.2), y.astype(np.int32), np.zeros(len(x), np.int32),
                 np.arange(len(x), dtype=np.int32))


POSTERIOR = BatchFormat(dtype="float32", flip=True, scale_factor=0.5)


def test_gradient_accumulation_gives_the_update_of_the_full_batch():
    # One objective is enough: latents, noise, time and dropout are drawn for the whole batch before it is
    # split, whatever the objective.
    objective = "ddpm"
    x, y = toy_data(8)
    results = {}
    for k in (1, 4):
        run = run_config(objective=objective, grad_accum=k)
        mesh = data_mesh(jax.devices()[:2])
        _, state, compiled = build_training(run, make_objective(run), mesh, POSTERIOR)
        assert compiled.grad_accum == k
        state, metrics = compiled.step(state, global_batch(mesh, posterior_batch(x, y)))
        results[k] = to_host((metrics, state["params"], state["ema"]))
    (metrics1, params1, ema1) = results[1]
    for k in (4,):
        metrics, params, ema = results[k]
        np.testing.assert_allclose(metrics["loss"], metrics1["loss"], rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], metrics1["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(metrics["quartile_sum"], metrics1["quartile_sum"], rtol=1e-5)
        np.testing.assert_array_equal(metrics["quartile_count"], metrics1["quartile_count"])
        for a, b in zip(jax.tree.leaves(params1) + jax.tree.leaves(ema1), jax.tree.leaves(params) + jax.tree.leaves(ema)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    # ... and the step really differs from a plain half batch (the test can tell microbatches apart).
    run = run_config(objective=objective)
    mesh = data_mesh(jax.devices()[:2])
    _, state, compiled = build_training(dataclasses.replace(run, train=dataclasses.replace(run.train, batch_size=4)),
                                        make_objective(run), mesh, POSTERIOR)
    _, half = compiled.step(state, global_batch(mesh, posterior_batch(x[:4], y[:4])))
    assert not np.allclose(to_host(half["loss"]), metrics1["loss"], rtol=1e-3)


def test_accumulated_run_resumes_exactly_and_matches_the_unaccumulated_run(tmp_path):
    plain = run_config(steps=8)
    accumulated = run_config(steps=8, grad_accum=2)
    straight = train_run(plain, tmp_path / "a", source(), make_objective(plain), progress=False)
    with pytest.raises(Interrupt):
        train_run(accumulated, tmp_path / "b", source(crash_at=7), make_objective(accumulated), progress=False)
    resumed = train_run(accumulated, tmp_path / "b", source(), make_objective(accumulated), resume=True, progress=False)
    again = train_run(accumulated, tmp_path / "c", source(), make_objective(accumulated), progress=False)
    assert resumed["params_sha256"] == again["params_sha256"]
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["train"]["grad_accum"] == 2 and config["compiled_step"]["grad_accum"] == 2
    a = [json.loads(l)["loss"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    c = [json.loads(l)["loss"] for l in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(c, a, rtol=1e-4)  # eight updates apart only by float32 rounding


def test_auto_accumulation_takes_the_fewest_microbatches_that_fit(monkeypatch):
    from dit.memory import CAPACITY_ENV, DoesNotFit
    from dit.train import compile_training
    run = run_config(grad_accum="auto")
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, batch_size=16))
    mesh = data_mesh(jax.devices()[:1])
    memory = {}
    for k in (1, 2, 4, 8):
        fixed = dataclasses.replace(run, train=dataclasses.replace(run.train, grad_accum=k))
        memory[k] = compile_training(fixed, make_objective(fixed), mesh).memory.total
    assert memory[1] > memory[2] > memory[4]  # microbatches need less memory
    # A capacity that holds the 4-microbatch step with 20% headroom, but not the 2-microbatch one.
    capacity = memory[4] / 0.8 * 1.001
    assert memory[2] > 0.8 * capacity
    monkeypatch.setenv(CAPACITY_ENV, str(capacity / 1e9))
    assert compile_training(run, make_objective(run), mesh).grad_accum == 4
    monkeypatch.setenv(CAPACITY_ENV, str(memory[8] * 0.5 / 1e9))  # half of what 8 microbatches need: no k fits
    with pytest.raises(DoesNotFit, match="does not fit.*grad_accum=1.*grad_accum=16"):
        compile_training(run, make_objective(run), mesh)


# REPA: per-class target directions for the 16 tokens of MODEL (8x8 latents, patch 2), 8 features each.
REPA_TARGETS = np.random.default_rng(5).integers(-127, 128, (4, 16, 8)).astype(np.int8)


class RepaSource(Source):
    batch_format = BatchFormat(repa_shape=(16, 8))

    def next(self):
        batch = super().next()
        return batch._replace(repa=REPA_TARGETS[batch.label])


def repa_run(steps=8, **train):
    return RunConfig(model=MODEL, data=DataConfig(flip=False), train=TrainConfig(
        steps=steps, batch_size=8, ckpt_every=4, log_every=2, objective="flow", repa_weight=0.5, repa_block=1,
        repa_target_dim=8, repa_projector_dim=32, **train))


def test_repa_trains_its_projector_resumes_exactly_and_accumulates_as_the_full_batch(tmp_path):
    run, accumulated = repa_run(), repa_run(grad_accum=2)
    x, y = toy_data()
    straight = train_run(run, tmp_path / "a", RepaSource(x, y, 8, seed=0), make_objective(run), progress=False)
    with pytest.raises(Interrupt):
        train_run(run, tmp_path / "b", RepaSource(x, y, 8, seed=0, crash_at=7), make_objective(run), progress=False)
    resumed = train_run(run, tmp_path / "b", RepaSource(x, y, 8, seed=0), make_objective(run), resume=True,
                        progress=False)
    assert resumed["params_sha256"] == straight["params_sha256"]  # the projector and its optimizer state resumed
    train_run(accumulated, tmp_path / "c", RepaSource(x, y, 8, seed=0), make_objective(accumulated), progress=False)
    metrics = {name: [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("a", "c")}
    assert all(-1 <= m["repa_loss"] <= 1 for m in metrics["a"])
    for key in ("loss", "repa_loss"):
        np.testing.assert_allclose([m[key] for m in metrics["c"]], [m[key] for m in metrics["a"]], rtol=1e-4)
    # The model's initial weights do not depend on REPA (the projector draws from its own stream).
    plain = run_config(objective="flow")
    _, with_repa, _ = build_training(run, make_objective(run), data_mesh(), RepaSource.batch_format)
    _, without, _ = build_training(plain, make_objective(plain), data_mesh())
    for a, b in zip(jax.tree.leaves(with_repa["params"]), jax.tree.leaves(without["params"])):
        np.testing.assert_array_equal(a, b)
    assert "projector" in with_repa and "projector" not in without


def test_repa_alignment_loss_falls():
    run = repa_run(steps=150, lr=1e-3)
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, log_every=50, ckpt_every=150))
    x, y = toy_data()
    import tempfile
    with tempfile.TemporaryDirectory() as workdir:
        train_run(run, Path(workdir) / "run", RepaSource(x, y, 8, seed=0), make_objective(run), progress=False)
        records = [json.loads(l) for l in (Path(workdir) / "run" / "metrics.jsonl").read_text().splitlines()]
    # Towards -1 (the targets are per class): measured -0.13 at step 50, -0.27 at step 150.
    assert records[-1]["repa_loss"] < records[0]["repa_loss"] - 0.08
