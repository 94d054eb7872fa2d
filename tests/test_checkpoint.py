"""Checkpoints: sealed with checksums after saving, damage found on restore, fallback to the newest intact one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.checkpoint import SEAL, Checkpoints
from dit.config import TrainConfig
from dit.mesh import data_mesh, replicated, split_over_devices


def saved(tmp_path, steps=(2, 4)):
    checkpoints = Checkpoints(tmp_path / "checkpoints", TrainConfig(keep_checkpoints=5))
    for step in steps:
        state = {"w": jnp.full((64, 64), float(step)), "step": jnp.asarray(step)}
        checkpoints.save(step, state, {"data": {"position": step}})
    checkpoints.wait()
    return checkpoints


def abstract():
    return {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}


def largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file() and p.name != SEAL), key=lambda p: p.stat().st_size)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda folder: largest_file(folder).write_bytes(largest_file(folder).read_bytes()[:10]),
    "deleted": lambda folder: largest_file(folder).unlink(),
    "metadata emptied": lambda folder: (folder / "_CHECKPOINT_METADATA").write_text(""),
    "bytes flipped": lambda folder: flip_a_byte(largest_file(folder)),
}


def test_every_finished_checkpoint_is_sealed_and_intact_ones_pass(tmp_path):
    checkpoints = saved(tmp_path)
    for step in (2, 4):
        seal = json.loads((tmp_path / "checkpoints" / str(step) / SEAL).read_text())
        assert any(name.startswith("state/") for name in seal) and checkpoints.damage(step) is None
    step, state, meta, skipped = checkpoints.restore_newest_intact(abstract())
    assert step == 4 and skipped == [] and meta["data"] == {"position": 4}
    np.testing.assert_array_equal(state["w"], 4.0)


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_is_found_and_the_one_before_restores(tmp_path, kind):
    checkpoints = saved(tmp_path)
    DAMAGE[kind](tmp_path / "checkpoints" / "4")
    assert checkpoints.damage(4) is not None and checkpoints.damage(2) is None
    step, state, meta, skipped = checkpoints.restore_newest_intact(abstract())
    assert step == 2 and [s for s, _ in skipped] == [4] and meta["data"] == {"position": 2}
    np.testing.assert_array_equal(state["w"], 2.0)
    aside = checkpoints.set_aside([4])  # never deleted: moved out of the way of the step saved again
    assert [p.name.split("-")[0] for p in aside.iterdir()] == ["4"] and checkpoints.manager.all_steps() == [2]


def test_an_unsealed_checkpoint_that_does_not_restore_is_skipped(tmp_path):
    checkpoints = saved(tmp_path)
    (tmp_path / "checkpoints" / "4" / SEAL).unlink()  # killed after the save, before its seal was written
    largest_file(tmp_path / "checkpoints" / "4").unlink()
    step, _, _, skipped = checkpoints.restore_newest_intact(abstract())
    assert step == 2 and skipped[0][0] == 4 and "does not restore" in skipped[0][1]


def test_a_checkpoint_restores_into_another_layout(tmp_path):
    # A run checkpointed with its weights whole on every device resumes with them split over the devices
    # (train.split_state, dit.train.SPLIT_PARTS), and back: the restore places each array as the target says.
    assert jax.device_count() == 8
    mesh = data_mesh()
    layouts = {"whole": replicated(mesh), "split": split_over_devices(mesh, (64, 64))}
    values = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)
    for saved_as, restored_as in (("whole", "split"), ("split", "whole")):
        checkpoints = Checkpoints(tmp_path / saved_as, TrainConfig())
        checkpoints.save(1, {"w": jax.device_put(values, layouts[saved_as])}, {})
        checkpoints.wait()
        target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=layouts[restored_as])}
        state, _ = checkpoints.restore(1, target)
        assert state["w"].sharding == layouts[restored_as]
        np.testing.assert_array_equal(state["w"], values)
        checkpoints.close()
