"""Reference statistics: a file that does not fit the feature network is refused when it is loaded."""

import numpy as np
import pytest

from dit.errors import UserError
from dit.eval.reference import load_reference


def saved(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_a_reference_of_the_right_shape_loads(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4)
    reference = load_reference(saved(tmp_path / "ref.npz", mu=mu, sigma=sigma, features=np.ones((3, 4))), dims=4)
    np.testing.assert_array_equal(reference.mu, mu)
    np.testing.assert_array_equal(reference.sigma, sigma)


@pytest.mark.parametrize("arrays, dims, message", [
    (dict(mu=np.zeros(10), sigma=np.eye(10)), 2048,
     r"mu has shape \(10,\) and sigma \(10, 10\), but the network that embeds the samples gives 2048 features: "
     r"mu \(2048,\) and sigma \(2048, 2048\)"),
    (dict(mu=np.zeros(8), sigma=np.zeros(8)), 8, r"mu has shape \(8,\) and sigma \(8,\)"),
    (dict(mu=np.zeros(8), sigma=np.eye(6)), None, r"mu has shape \(8,\) and sigma \(6, 6\), but FID needs"),
    (dict(mu=np.zeros(4), sigma=np.eye(4), features=np.ones((3, 5))), 4, r"features have shape \(3, 5\)"),
    (dict(mu=np.array([0.0, np.nan]), sigma=np.eye(2)), 2, "NaN or infinite"),
])
def test_a_reference_that_does_not_fit_is_refused_naming_the_shapes(tmp_path, arrays, dims, message):
    with pytest.raises(UserError, match=message) as error:
        load_reference(saved(tmp_path / "ref.npz", **arrays), dims=dims)
    assert "ref.npz" in str(error.value) and "dit.eval.ref_stats" in str(error.value)
