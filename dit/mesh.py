"""Data parallelism over every device of every process: a 1D mesh with a batch axis."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit.errors import UserError

BATCH_AXIS = "batch"


def data_mesh(devices=None) -> Mesh:
    """A mesh with one axis, `batch`, over the given devices (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    # Auto axes: the compiler propagates the batch sharding through the model (no per-op annotations).
    return Mesh(np.asarray(devices), (BATCH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def split_over_devices(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """An array of `shape` split along its last axis that divides evenly over the devices (each device
    holds 1/n of it); replicated when no axis does.

    The last rather than the first: for the stacked blocks' (depth, in, out) weights, XLA's TPU cost
    model put the DiT-S/2 step with the optimizer state split this way 1% faster (fewer copies when the
    updated weights are gathered)."""
    for axis in reversed(range(len(shape))):
        if shape[axis] % mesh.devices.size == 0:
            return NamedSharding(mesh, PartitionSpec(*[None] * axis, BATCH_AXIS))
    return replicated(mesh)


def local_batch_size(global_batch: int) -> int:
    """This process's share of the global batch; the global batch must split evenly over devices."""
    if global_batch % jax.device_count():
        raise UserError(
            f"train.batch_size={global_batch} does not split evenly over {jax.device_count()} devices; "
            f"use a multiple of {jax.device_count()}."
        )
    return global_batch // jax.process_count()


def global_batch(mesh: Mesh, local_arrays):
    """Each process's rows -> one global array per leaf, sharded along the batch axis."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_arrays)


def to_host(tree):
    """Device arrays -> whole numpy arrays on every process, each from this process's own copy; arrays
    split over devices are first gathered, all in one program (with several processes a collective:
    every process must call it)."""
    leaves, treedef = jax.tree.flatten(tree)
    split = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array) and not a.is_fully_replicated]
    if split:
        whole = [NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in split]
        for i, a in zip(split, jax.jit(lambda arrays: arrays, out_shardings=whole)([leaves[i] for i in split])):
            leaves[i] = a
    return jax.tree.unflatten(treedef, [np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a
                                        for a in leaves])
