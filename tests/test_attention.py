"""Our attention against a plain NumPy softmax attention, and the properties of 2D RoPE and QK-norm."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit.attention import SelfAttention, apply_rope, rope_2d_angles


def numpy_attention(x, wqkv, bqkv, wproj, bproj, heads):
    b, t, d = x.shape
    hd = d // heads
    qkv = (x @ wqkv + bqkv).reshape(b, t, 3, heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, t, d) @ wproj + bproj


def test_attention_matches_numpy():
    attn = SelfAttention(32, 4, nnx.Rngs(0), jnp.float32)
    attn.qkv.bias[...] = 0.1 * jax.random.normal(jax.random.key(1), (96,))
    x = np.random.default_rng(0).normal(size=(2, 10, 32)).astype(np.float32)
    ref = numpy_attention(x.astype(np.float64), *(np.asarray(a[...], np.float64) for a in
                          (attn.qkv.kernel, attn.qkv.bias, attn.proj.kernel, attn.proj.bias)), heads=4)
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_offset():
    grid, head_dim = 6, 16
    angles = jnp.asarray(rope_2d_angles(grid, head_dim))
    rng = np.random.default_rng(0)
    # The same query and key vector at every position: any change in score comes from position alone.
    q = jnp.broadcast_to(jnp.asarray(rng.normal(size=head_dim), jnp.float32), (1, grid * grid, 1, head_dim))
    k = jnp.broadcast_to(jnp.asarray(rng.normal(size=head_dim), jnp.float32), (1, grid * grid, 1, head_dim))
    scores = np.asarray(jnp.einsum("bqhd,bkhd->qk", apply_rope(q, angles), apply_rope(k, angles)))
    pos = [(i // grid, i % grid) for i in range(grid * grid)]
    by_offset = {}
    for i, (ri, ci) in enumerate(pos):
        for j, (rj, cj) in enumerate(pos):
            by_offset.setdefault((ri - rj, ci - cj), []).append(scores[i, j])
    for values in by_offset.values():
        np.testing.assert_allclose(values, values[0], rtol=1e-4, atol=1e-4)
    # ... and it does depend on the offset, along rows and along columns.
    assert abs(by_offset[(0, 0)][0] - by_offset[(1, 0)][0]) > 1e-3
    assert abs(by_offset[(0, 0)][0] - by_offset[(0, 1)][0]) > 1e-3


def test_rope_is_a_rotation():
    angles = jnp.asarray(rope_2d_angles(4, 8))
    x = jax.random.normal(jax.random.key(0), (2, 16, 3, 8))
    rotated = apply_rope(x, angles)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(rotated[:, 0], x[:, 0], rtol=1e-6)  # position (0, 0) is not rotated


def test_qk_norm_makes_attention_invariant_to_query_key_scale():
    attn = SelfAttention(32, 4, nnx.Rngs(0), jnp.float32, qk_norm=True)
    x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    before = attn(x)
    kernel = attn.qkv.kernel[...]
    attn.qkv.kernel[...] = kernel.at[:, :64].multiply(7.0)  # scale the q and k projections only
    np.testing.assert_allclose(attn(x), before, rtol=1e-4, atol=1e-5)
