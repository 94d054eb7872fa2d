"""Our attention against a plain NumPy softmax attention, blockwise against dense attention, and the
properties of 2D RoPE and QK-norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit.attention import (SelfAttention, apply_rope, blockwise_attention, dense_attention, flash_dense_attention,
                           heads_first_attention, key_blocks_written_out, rope_2d_angles)


def numpy_attention(x, wqkv, bqkv, wproj, bproj, heads):
    b, t, d = x.shape
    hd = d // heads
    qkv = (x @ wqkv + bqkv).reshape(b, t, 3, heads, hd)
    q, k, v = (qkv[:, :, i] for i in range(3))
    return numpy_softmax_attention(q / np.sqrt(hd), k, v).reshape(b, t, d) @ wproj + bproj


def numpy_softmax_attention(q, k, v):
    """(B, T, H, D) softmax attention with q pre-scaled, as dense_attention takes it."""
    s = np.einsum("bqhd,bkhd->bhqk", q, k)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def test_attention_matches_numpy():
    attn = SelfAttention(32, 4, nnx.Rngs(0), jnp.float32)
    attn.qkv.bias[...] = 0.1 * jax.random.normal(jax.random.key(1), (96,))
    x = np.random.default_rng(0).normal(size=(2, 10, 32)).astype(np.float32)
    ref = numpy_attention(x.astype(np.float64), *(np.asarray(a[...], np.float64) for a in
                          (attn.qkv.kernel, attn.qkv.bias, attn.proj.kernel, attn.proj.bias)), heads=4)
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def test_one_qkv_product_equals_three_forward_and_backward():
    # SelfAttention makes q, k, v with one product for dense attention without QK-norm and with three
    # elsewhere; both must be the same function, bias gradients included.
    attn = SelfAttention(32, 4, nnx.Rngs(0), jnp.float32)
    attn.qkv.bias[...] = 0.1 * jax.random.normal(jax.random.key(1), (96,))
    graphdef, params = nnx.split(attn)
    x = jax.random.normal(jax.random.key(2), (2, 10, 32))
    cotangents = [jax.random.normal(jax.random.key(3 + i), (2, 10, 4, 8)) for i in range(3)]

    def projected(params, x, one_product):
        return nnx.merge(graphdef, params)._projections(x, one_product)

    def loss(params, x, one_product):
        return sum(jnp.sum(a * c) for a, c in zip(projected(params, x, one_product), cotangents))

    for one, three in zip(projected(params, x, True), projected(params, x, False)):
        np.testing.assert_allclose(one, three, rtol=1e-6, atol=1e-6)

    def gradients(one_product):  # the qkv weight's, its bias's and the input's
        params_grad, x_grad = jax.grad(loss, argnums=(0, 1))(params, x, one_product)
        return params_grad["qkv"]["kernel"][...], params_grad["qkv"]["bias"][...], x_grad

    for g, e in zip(gradients(True), gradients(False)):
        assert np.abs(np.asarray(e)).max() > 0
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_rotates_each_channel_with_the_one_half_a_head_away(dtype):
    # apply_rope swaps the halves with a permutation product; it must equal the rotation written with
    # slices, in float32 from x's values and rounded once to x's dtype.
    angles = rope_2d_angles(4, 8)
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 16, 3, 8)).astype(dtype), np.float64)
    x1, x2 = x[..., :4], x[..., 4:]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    expected = np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    rotated = apply_rope(jnp.asarray(x, dtype), jnp.asarray(angles))
    assert rotated.dtype == dtype
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(rotated, np.float64), expected, rtol=tolerance, atol=tolerance)


def test_qk_norm_makes_attention_invariant_to_query_key_scale():
    attn = SelfAttention(32, 4, nnx.Rngs(0), jnp.float32, qk_norm=True)
    x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    before = attn(x)
    kernel = attn.qkv.kernel[...]
    attn.qkv.kernel[...] = kernel.at[:, :64].multiply(7.0)  # scale the q and k projections only
    np.testing.assert_allclose(attn(x), before, rtol=1e-4, atol=1e-5)


def random_qkv(t, dtype=jnp.float32, shape=(2, 3), head_dim=8):
    b, h = shape
    q, k, v, cotangent = (jax.random.normal(jax.random.key(i), (b, t, h, head_dim)) for i in range(4))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), cotangent


def blockwise(block_size):
    return lambda q, k, v: blockwise_attention(q, k, v, block_size)


def linear_functional_grads(fn, q, k, v, cotangent):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent), argnums=(0, 1, 2))(q, k, v)


def test_the_two_dense_implementations_agree_forward_and_backward():
    # dense_attention runs heads_first_attention on the CPU and flash_dense_attention on accelerators;
    # both are plain JAX, so both are checked here.
    q, k, v, cotangent = random_qkv(37)
    reference = numpy_softmax_attention(*(np.asarray(a, np.float64) for a in (q, k, v)))
    for fn in (heads_first_attention, flash_dense_attention, dense_attention):
        np.testing.assert_allclose(fn(q, k, v), reference, rtol=1e-5, atol=1e-5)
    expected = linear_functional_grads(heads_first_attention, q, k, v, cotangent)
    for g, e in zip(jax.jit(lambda *a: linear_functional_grads(flash_dense_attention, *a))(q, k, v, cotangent),
                    expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)



# 37 is not a multiple of any block size; 8 and 64 >= T cover a single (clamped) block.
@pytest.mark.parametrize("t", [8, 16, 37])
@pytest.mark.parametrize("block_size", [4, 8, 64])
def test_blockwise_matches_dense(t, block_size):
    q, k, v, _ = random_qkv(t)
    np.testing.assert_allclose(blockwise(block_size)(q, k, v), dense_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [16, 37])
@pytest.mark.parametrize("block_size", [4, 8, 64])
def test_blockwise_gradients_match_dense(t, block_size):
    q, k, v, cotangent = random_qkv(t)
    expected = linear_functional_grads(dense_attention, q, k, v, cotangent)
    got = jax.jit(lambda *a: linear_functional_grads(blockwise(block_size), *a))(q, k, v, cotangent)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_key_blocks_written_out_leave_no_loop_and_the_same_gradients():
    # dit.aot traces the program for XLA's cost model this way: the cost model counts a loop's body once.
    q, k, v, cotangent = random_qkv(37)
    grads = lambda: jax.jit(lambda *a: linear_functional_grads(blockwise(8), *a))  # fresh: jit caches by function
    looped = grads().lower(q, k, v, cotangent).as_text()
    with key_blocks_written_out():
        written_out = grads().lower(q, k, v, cotangent).as_text()
        unrolled = grads()(q, k, v, cotangent)
    assert "while" in looped and "while" not in written_out
    for g, e in zip(unrolled, grads()(q, k, v, cotangent)):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


def module_loss_and_grads(attention, x, angles, cotangent):
    attn = SelfAttention(32, 4, nnx.Rngs(0), jnp.float32, qk_norm=True, attention=attention, block_size=8)
    attn.qkv.bias[...] = 0.1 * jax.random.normal(jax.random.key(1), (96,))
    graphdef, params = nnx.split(attn)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, angles) * cotangent)

    return attn(x, angles), jax.grad(loss, argnums=(0, 1))(params, x)


def test_self_attention_blockwise_matches_dense_with_rope_and_qk_norm():
    x = jax.random.normal(jax.random.key(2), (2, 36, 32))
    cotangent = jax.random.normal(jax.random.key(3), (2, 36, 32))
    angles = jnp.asarray(rope_2d_angles(6, 8))  # 36 tokens: the last 8-key block is padded
    dense_out, dense_grads = module_loss_and_grads("dense", x, angles, cotangent)
    block_out, block_grads = module_loss_and_grads("blockwise", x, angles, cotangent)
    np.testing.assert_allclose(block_out, dense_out, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(block_grads) == jax.tree.structure(dense_grads)
    for g, e in zip(jax.tree.leaves(block_grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [blockwise(8), flash_dense_attention], ids=["blockwise", "flash_dense"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_is_close_to_dense(dtype, fn):
    q, k, v, cotangent = random_qkv(37, dtype)
    out = fn(q, k, v)
    assert out.dtype == dtype
    expected = dense_attention(q, k, v).astype(jnp.float32)
    assert jnp.linalg.norm(out.astype(jnp.float32) - expected) / jnp.linalg.norm(expected) < 2e-2
    grads = linear_functional_grads(fn, q, k, v, cotangent)
    for g, e in zip(grads, linear_functional_grads(dense_attention, q, k, v, cotangent)):
        assert g.dtype == dtype
        g, e = g.astype(jnp.float32), e.astype(jnp.float32)
        assert jnp.linalg.norm(g - e) / jnp.linalg.norm(e) < 2e-2


def gradient_temporaries(fn, t):
    s = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
    grad = jax.jit(lambda q, k, v: linear_functional_grads(fn, q, k, v, q))
    return grad.lower(s, s, s).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_gradient_memory_is_linear_in_tokens():
    dense = [gradient_temporaries(dense_attention, t) for t in (512, 1024)]
    block = [gradient_temporaries(blockwise(64), t) for t in (512, 1024)]
    assert dense[1] >= 1 * 4 * 1024 * 1024 * 4  # the dense gradient holds at least the float32 logits
    assert dense[1] / dense[0] > 3.5
    # Without the custom VJP the scan's autodiff stores every block's probabilities: about 4x growth and
    # over half the dense temporaries; with it, about 2x growth and, at 1024 tokens, under a quarter of the
    # dense gradient (which recomputes its probabilities too, but all T x T of them at once).
    assert block[1] / block[0] < 2.5
    assert block[1] < dense[1] / 4
