"""The data-parallel mesh: splitting arrays over its devices and bringing them back to the host."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from dit.mesh import data_mesh, replicated, split_over_devices, to_host


def test_split_over_devices_takes_the_last_axis_that_divides():
    mesh = data_mesh()
    assert jax.device_count() == 8
    assert split_over_devices(mesh, (12, 384, 2304)).spec == P(None, None, "batch")
    assert split_over_devices(mesh, (16, 3)).spec == P("batch")
    assert split_over_devices(mesh, (3, 5)) == replicated(mesh)  # nothing divides by 8
    assert split_over_devices(mesh, ()) == replicated(mesh)


def test_to_host_gives_whole_arrays_whether_split_or_replicated():
    mesh = data_mesh()
    value = np.arange(16 * 12, dtype=np.float32).reshape(16, 12)
    split = jax.device_put(value, split_over_devices(mesh, value.shape))
    assert split.addressable_shards[0].data.shape == (2, 12)
    whole = to_host({"split": split, "replicated": jax.device_put(value, replicated(mesh)), "number": 3})
    np.testing.assert_array_equal(whole["split"], value)
    np.testing.assert_array_equal(whole["replicated"], value)
    assert whole["number"] == 3
