"""Multi-head self-attention (dense, or blockwise for long sequences) and 2D axial rotary position embedding.

q, k and v stay in the (B, T, H, D) layout the projections make: on accelerators the products name the
head axis as a batch axis, so no transposes are written out and XLA picks the layout. There both kinds
of attention have FlashAttention's backward: the forward keeps only the output and the float32
log-sum-exp of each query, and the backward recomputes the probabilities from them, so no (T, T)
tensor is saved for the backward pass (it is recomputed there at the cost of one q.k product). On the
CPU, dense attention moves the heads next to the batch and uses autodiff's backward (faster there).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dit.layers import linear, rms_norm, weight_product


@functools.lru_cache(maxsize=None)
def rope_2d_angles(grid_size: int, head_dim: int, theta: float = 10_000.0) -> np.ndarray:
    """Rotation angles (T, head_dim // 2), one per pair of channels, for tokens on a row-major grid.

    The first half of the pairs rotates with the token's row, the second half with its column, each
    with the usual RoPE frequencies over its quarter of the head.
    """
    pairs_per_axis = head_dim // 4
    freqs = 1.0 / theta ** (np.arange(pairs_per_axis, dtype=np.float64) / pairs_per_axis)
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    angles = np.concatenate([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], axis=1)
    return angles.astype(np.float32)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates channel i with channel i + D/2 of x (B, T, H, D) by angles (T, D/2), in float32.

    Pairs are the two halves of the head (GPT-NeoX's layout) rather than neighbouring channels: the same
    rotations up to a fixed permutation of the head's channels, without a trailing axis of size 2, which
    a TPU pads to 128 lanes. The halves are swapped by a product with a (D, D) permutation matrix (exact:
    one 1 per column, at the highest precision) rather than sliced and concatenated, so the rotation is
    elementwise work that XLA fuses into q's and k's consumers: the TPU v3-8 step of rope_swiglu (DiT-S/2
    in bfloat16, batch 256, cost model) 35.63 -> 35.28 ms with q, k, v from three products, 35.15 ms from
    one (measured 2026-12-08).
    """
    half = x.shape[-1] // 2
    cos = jnp.cos(jnp.concatenate([angles, angles], axis=-1))[:, None, :]
    sin = jnp.sin(jnp.concatenate([-angles, angles], axis=-1))[:, None, :]
    # (x @ swap)[..., i] = x[..., i + D/2 mod D]: the other channel of channel i's pair.
    swap = jnp.asarray(np.roll(np.eye(x.shape[-1]), half, axis=1), x.dtype)
    swapped = jnp.einsum("bthd,de->bthe", x, swap, precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)
    return (x.astype(jnp.float32) * cos + swapped * sin).astype(x.dtype)


def _logits_dtype(q: jax.Array):
    """The dtype the q.k product is rounded to before the float32 softmax (see _logits)."""
    return jnp.bfloat16 if q.dtype == jnp.bfloat16 else jnp.float32


def _logits(q: jax.Array, k: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """(B, Tq, H, D) x (B, Tk, H, D) -> float32 (B, H, Tq, Tk); invalid keys at -inf.

    In bfloat16 the product is rounded to bfloat16 (accumulated in float32) and the softmax is computed in
    float32 from it: half the bytes of the largest tensors of the step. Measured 2026-12-07: the TPU v3-8
    cost-model step of DiT-S/2 at batch 256 is 9% faster; one step's bf16-vs-fp32 gradient error is 1.400%
    against 1.398% with float32 logits (2.53% against 2.51% for rope_swiglu); the bf16 rope_swiglu demo
    ends at loss 0.2609 against 0.2602 and fd_digits 10.5 against 10.8. float16 keeps float32 logits (its
    range ends at 65504).
    """
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_logits_dtype(q)).astype(jnp.float32)
    return s if valid is None else jnp.where(valid, s, -jnp.inf)


def _block_gradients(q, k, v, lse, delta, d_out, valid=None):
    """FlashAttention-2's backward over one block of keys: the probabilities recomputed from the
    log-sum-exp, then (dq's share from this block, dk, dv), all float32."""
    p = jnp.exp(_logits(q, k, valid) - lse[..., None])
    dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None])).astype(q.dtype)
    dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _delta(out: jax.Array, d_out: jax.Array) -> jax.Array:
    """rowsum(dO * O) per query, (B, H, T): equals rowsum(P * dP), the softmax's correction term, without a
    pass over the keys."""
    return jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))


def _saved(out: jax.Array, lse: jax.Array):
    # Named, so that a remat policy (dit.model's scanned blocks) keeps them rather than rerunning attention.
    return checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over (B, T, H, D) with q pre-scaled; the softmax in float32 (see _logits).

    Two implementations of the same function, chosen for the platform the program is lowered for: on
    accelerators the (T, T) tensors are the step's largest, so FlashAttention's backward (recompute them
    rather than store them) wins; on the CPU the products dominate, and plain autodiff of attention with
    the heads moved next to the batch is faster (DiT-S/2 block at batch 8: 49 against 57 ms forward and
    backward, 2026-12-07)."""
    return jax.lax.platform_dependent(q, k, v, cpu=heads_first_attention, default=flash_dense_attention)


def heads_first_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """dense_attention with (B, H, T, D) products and autodiff's backward.

    The scanned blocks (the CPU's default) do not keep the weights for the backward: their remat policy
    recomputes the softmax from q and k, which the softmax's backward did even when the weights were
    kept, so keeping them only cost a (depth, B, H, T, T) buffer written every step (DiT-S/2 at batch 8,
    float32: 151 MB; its gradient was 4-7% slower with it, timed alternately in two runs on 2026-12-07).
    They keep the output, under FlashAttention's name: the output projection's weight gradient needs it,
    and recomputing it was one more product a block (the one-core step about 0.1 s faster with it kept,
    at 41 MB more temporaries; 2026-12-08).
    """
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=_logits_dtype(q)).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)
    return checkpoint_name(out, "attention_out")


@jax.custom_vjp
def flash_dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """dense_attention with FlashAttention's backward: only the output and the log-sum-exp are kept."""
    return _dense_fwd(q, k, v)[0]


def _dense_fwd(q, k, v):
    logits = _logits(q, k)
    lse = jax.nn.logsumexp(logits, axis=-1)
    weights = jnp.exp(logits - lse[..., None]).astype(v.dtype)
    out, lse = _saved(jnp.einsum("bhqk,bkhd->bqhd", weights, v), lse)
    return out, (q, k, v, out, lse)


def _dense_bwd(residuals, d_out):
    q, k, v, out, lse = residuals
    dq, dk, dv = _block_gradients(q, k, v, lse, _delta(out, d_out), d_out)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


flash_dense_attention.defvjp(_dense_fwd, _dense_bwd)


def _key_blocks(x: jax.Array, block: int, count: int) -> jax.Array:
    """(B, T, H, D) -> (count, B, block, H, D), zero-padded at the end of the tokens."""
    b, t, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, block * count - t), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(b, count, block, h, d), 1, 0)


def _unblock(x: jax.Array, t: int) -> jax.Array:
    """Inverse of _key_blocks: (count, B, block, H, D) -> (B, t, H, D)."""
    count, b, block, h, d = x.shape
    return jnp.moveaxis(x, 0, 1).reshape(b, count * block, h, d)[:, :t]


def _blocks(k: jax.Array, v: jax.Array, block_size: int):
    """Keys and values split into blocks, and which keys are real (None when T divides evenly)."""
    t = k.shape[1]
    block = min(block_size, t)
    count = -(-t // block)
    # Padding the keys and masking them out is exact for any T; only the last block holds padding, and
    # it always holds at least one real key, so no row of a block is entirely masked.
    valid = None
    if block * count != t:
        valid = jnp.asarray((np.arange(block * count) < t).reshape(count, block))
    return _key_blocks(k, block, count), _key_blocks(v, block, count), valid


# Whether blockwise attention writes its loops over key blocks out; only dit.aot sets it, while it traces
# the program it hands to XLA's cost model, which counts a loop's body once. The programs that run keep
# the loops: written out, XLA keeps more blocks alive (patch1 on a TPU v3-8: 9.5 against 5.2 GB).
_KEY_BLOCKS_WRITTEN_OUT = contextvars.ContextVar("key_blocks_written_out", default=False)


@contextlib.contextmanager
def key_blocks_written_out():
    """Within it, blockwise attention is traced with its key-block loops unrolled (trace a fresh function
    in it: jit caches a function's trace whatever this says)."""
    token = _KEY_BLOCKS_WRITTEN_OUT.set(True)
    try:
        yield
    finally:
        _KEY_BLOCKS_WRITTEN_OUT.reset(token)


def _blockwise_forward(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int, unroll: bool):
    """Online softmax over key blocks: the output (in v.dtype) and the float32 log-sum-exp per query."""
    k_blocks, v_blocks, valid = _blocks(k, v, block_size)
    b, t, h, d = q.shape

    def step(carry, blocks):
        m, l, acc = carry
        k_block, v_block, valid_block = blocks
        s = _logits(q, k_block, valid_block)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        # Rescales what was summed under the old running max to the new one.
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v_block, preferred_element_type=jnp.float32)
        return (m_new, l, acc * jnp.moveaxis(correction, 1, 2)[..., None] + pv), None

    init = (jnp.full((b, h, t), -jnp.inf, jnp.float32), jnp.zeros((b, h, t), jnp.float32),
            jnp.zeros((b, t, h, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, valid), unroll=unroll)
    return (acc / jnp.moveaxis(l, 1, 2)[..., None]).astype(v.dtype), m + jnp.log(l)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int) -> jax.Array:
    """dense_attention computed over blocks of block_size keys, in memory linear in T (FlashAttention)."""
    return _blockwise_attention(q, k, v, block_size, _KEY_BLOCKS_WRITTEN_OUT.get())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blockwise_attention(q, k, v, block_size, unroll):
    return _blockwise_forward(q, k, v, block_size, unroll)[0]


def _blockwise_fwd(q, k, v, block_size, unroll):
    out, lse = _saved(*_blockwise_forward(q, k, v, block_size, unroll))
    return out, (q, k, v, out, lse)


def _blockwise_bwd(block_size, unroll, residuals, d_out):
    q, k, v, out, lse = residuals
    k_blocks, v_blocks, valid = _blocks(k, v, block_size)
    delta = _delta(out, d_out)

    def step(dq, blocks):
        k_block, v_block, valid_block = blocks
        dq_block, dk, dv = _block_gradients(q, k_block, v_block, lse, delta, d_out, valid_block)
        return dq + dq_block, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (k_blocks, v_blocks, valid),
                                unroll=unroll)
    t = k.shape[1]
    return dq.astype(q.dtype), _unblock(dk, t).astype(k.dtype), _unblock(dv, t).astype(v.dtype)


_blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


class SelfAttention(nnx.Module):
    """qkv projection (with bias), optional per-head RMS norm of q and k, optional RoPE, softmax in float32.

    attention="blockwise" computes the same attention with blockwise_attention over blocks of block_size keys.
    """

    def __init__(self, hidden_size: int, num_heads: int, rngs: nnx.Rngs, dtype, qk_norm: bool = False,
                 attention: str = "dense", block_size: int = 128):
        if attention not in ("dense", "blockwise"):
            raise ValueError(f"attention must be 'dense' or 'blockwise', got {attention!r}")
        self.attention = attention
        self.block_size = block_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = linear(hidden_size, 3 * hidden_size, rngs, dtype)
        self.proj = linear(hidden_size, hidden_size, rngs, dtype)
        if qk_norm:
            self.q_scale = nnx.Param(jnp.ones((self.head_dim,), jnp.float32))
            self.k_scale = nnx.Param(jnp.ones((self.head_dim,), jnp.float32))
        else:
            self.q_scale = self.k_scale = None

    def _projections(self, x: jax.Array, one_product: bool) -> list[jax.Array]:
        """q, k, v (B, T, H, D) from the qkv weight in timm's (3, heads, head_dim) output layout: one
        product, each bias added to its own slice, or three products with thirds of the weight.

        One product reads x once in the forward pass and once in each of the backward's two products,
        where three read it three times and sum three partial input gradients; adding each bias to its
        slice keeps the bias gradients inside the fusions that compute dq, dk and dv (one bias over the
        whole product needed a separate pass over its gradient). Three products where q and k are
        normalized per head (QK-norm: XLA copies the whole product into another layout for the norms)
        and for blockwise attention (its program moved 100.7 -> 113.7 GB per core with one). Measured
        2026-12-08, TPU v3-8 cost model, DiT-S/2 in bfloat16 at batch 256, three products -> one: baseline
        31.02 -> 29.93 ms (11.21 -> 10.52 GB moved per core; one bias over the product: 30.46 ms),
        rope_swiglu 35.28 -> 35.15 ms, lightning 35.04 -> 34.92 ms; but qknorm 32.61 -> 33.75 ms and patch1
        (blockwise) 256.5 -> 290.2 ms. The products are weight_product's (on the CPU, its own backward).
        """
        dtype = self.qkv.dtype or x.dtype
        c, h, d = x.shape[-1], self.num_heads, self.head_dim
        kernel = self.qkv.kernel[...].reshape(c, 3, h, d).astype(dtype)
        bias = self.qkv.bias[...].reshape(3, h, d).astype(dtype)
        x = x.astype(dtype)
        if one_product:
            qkv = weight_product(x, kernel)
            return [qkv[:, :, i] + bias[i] for i in range(3)]
        return [weight_product(x, kernel[:, i]) + bias[i] for i in range(3)]

    def __call__(self, x: jax.Array, rope_angles: jax.Array | None = None) -> jax.Array:
        with jax.named_scope("qkv"):
            q, k, v = self._projections(x, one_product=self.attention == "dense" and self.q_scale is None)
            if self.q_scale is not None:
                q = (rms_norm(q) * self.q_scale[...]).astype(v.dtype)
                k = (rms_norm(k) * self.k_scale[...]).astype(v.dtype)
            if rope_angles is not None:
                q, k = apply_rope(q, rope_angles), apply_rope(k, rope_angles)
            q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        with jax.named_scope("softmax_attention"):
            if self.attention == "blockwise":
                out = blockwise_attention(q, k, v, self.block_size)
            else:
                out = dense_attention(q, k, v)
        # The heads and channels contracted straight from (B, T, H, D): no reshape of the activations.
        kernel = self.proj.kernel[...].reshape(self.num_heads, self.head_dim, -1).astype(out.dtype)
        return weight_product(out, kernel, axes=2) + self.proj.bias[...].astype(out.dtype)
