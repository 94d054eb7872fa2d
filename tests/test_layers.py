"""Embeddings and token layout, checked against diffusers' implementations where they exist."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.config import ModelConfig
from dit.layers import (patchify, round_gradient, sincos_pos_embed_2d, timestep_embedding, unpatchify,
                        weight_product)


def test_timestep_embedding_matches_diffusers_with_dit_settings():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    torch = pytest.importorskip("torch")
    t = np.array([0, 1, 17, 500, 999])
    ref = embeddings.get_timestep_embedding(torch.tensor(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    np.testing.assert_allclose(np.asarray(timestep_embedding(jnp.asarray(t))), ref.numpy(), rtol=0, atol=1e-4)  # float32 args up to 999


def test_sincos_pos_embed_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    try:
        ref = embeddings.get_2d_sincos_pos_embed(384, 16, output_type="np")
    except TypeError:  # older diffusers: numpy only, no output_type
        ref = embeddings.get_2d_sincos_pos_embed(384, 16)
    np.testing.assert_allclose(sincos_pos_embed_2d(384, 16), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_patchify_unpatchify_round_trip_and_layout():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 12)
    # token 1 is the patch at row 0, column 1; its features run (row, column, channel)
    np.testing.assert_array_equal(tokens[0, 1, :3], x[0, 0, 2])
    np.testing.assert_array_equal(tokens[0, 1, 3:6], x[0, 0, 3])
    np.testing.assert_array_equal(tokens[0, 1, 6:9], x[0, 1, 2])
    np.testing.assert_array_equal(unpatchify(tokens, 2, 3), x)


def test_swiglu_width_keeps_the_weight_count():
    cfg = ModelConfig(mlp="swiglu")
    assert cfg.mlp_hidden == 1024
    assert 3 * cfg.hidden_size * cfg.mlp_hidden == 2 * cfg.hidden_size * ModelConfig().mlp_hidden


def test_norm_weight_scales_each_channel_after_normalising():
    import jax
    from dit.layers import Norm, layer_norm, rms_norm
    x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 3 + 1
    weighted = Norm("rmsnorm", 16, weight=True)
    weighted.weight.set_value(jnp.arange(16, dtype=jnp.float32))
    np.testing.assert_allclose(weighted(x), rms_norm(x) * jnp.arange(16), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(jnp.square(Norm("rmsnorm", 16)(x)), -1)), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(Norm("layernorm", 16)(x), layer_norm(x))
    assert Norm("layernorm", 16).weight is None  # DiT's norms have no parameters


def test_round_gradient_leaves_the_value_and_rounds_the_gradient():
    x = jax.random.normal(jax.random.key(0), (64,), jnp.float32)
    weights = jax.random.normal(jax.random.key(1), (64,), jnp.float32)  # the gradient of sum(weights * x)
    np.testing.assert_array_equal(round_gradient(x, jnp.bfloat16), x)
    gradient = jax.grad(lambda x: jnp.sum(weights * round_gradient(x, jnp.bfloat16)))(x)
    assert gradient.dtype == jnp.float32
    np.testing.assert_array_equal(gradient, weights.astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(gradient, weights)


@pytest.mark.parametrize("x_shape, w_shape, axes", [((2, 5, 8), (8, 3, 4), 1), ((2, 5, 3, 4), (3, 4, 8), 2)])
def test_weight_product_gradients_are_autodiffs(x_shape, w_shape, axes):
    # On the CPU (where the tests run) weight_product's backward is written out: it must be autodiff's.
    key_x, key_w, key_c = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(key_x, x_shape), jax.random.normal(key_w, w_shape)
    cotangent = jax.random.normal(key_c, x_shape[:-axes] + w_shape[axes:])
    gradients = lambda product: jax.jit(jax.grad(lambda x, w: jnp.sum(product(x, w) * cotangent), argnums=(0, 1)))
    ours = lambda x, w: weight_product(x, w, axes)
    autodiffs = lambda x, w: jnp.tensordot(x, w, axes)
    np.testing.assert_array_equal(jax.jit(ours)(x, w), autodiffs(x, w))
    for got, expected in zip(gradients(ours)(x, w), gradients(autodiffs)(x, w)):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
