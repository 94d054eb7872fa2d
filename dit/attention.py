"""Multi-head self-attention, written out with einsums, and 2D axial rotary position embedding (RoPE)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit.layers import linear, rms_norm


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
    """Rotates consecutive channel pairs of x (B, T, H, D) by angles (T, D/2), in float32."""
    b, t, h, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, t, h, d // 2, 2)
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    first, second = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return rotated.reshape(b, t, h, d).astype(x.dtype)


class SelfAttention(nnx.Module):
    """qkv projection (with bias), optional per-head RMS norm of q and k, optional RoPE, softmax in float32."""

    def __init__(self, hidden_size: int, num_heads: int, rngs: nnx.Rngs, dtype, qk_norm: bool = False):
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = linear(hidden_size, 3 * hidden_size, rngs, dtype)
        self.proj = linear(hidden_size, hidden_size, rngs, dtype)
        if qk_norm:
            self.q_scale = nnx.Param(jnp.ones((self.head_dim,), jnp.float32))
            self.k_scale = nnx.Param(jnp.ones((self.head_dim,), jnp.float32))
        else:
            self.q_scale = self.k_scale = None

    def __call__(self, x: jax.Array, rope_angles: jax.Array | None = None) -> jax.Array:
        b, t, _ = x.shape
        # The qkv output is laid out (3, heads, head_dim), as timm's Attention that DiT uses.
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_scale is not None:
            q = (rms_norm(q) * self.q_scale[...]).astype(v.dtype)
            k = (rms_norm(k) * self.k_scale[...]).astype(v.dtype)
        if rope_angles is not None:
            q, k = apply_rope(q, rope_angles), apply_rope(k, rope_angles)
        q = q * jnp.asarray(self.head_dim**-0.5, q.dtype)
        # Heads next to the batch before the products: (b, h) become the leading batch dimensions of both
        # matrix products, which XLA:CPU runs 2.5x faster forward than with heads between tokens and channels.
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3)
        return self.proj(out.reshape(b, t, self.num_heads * self.head_dim))
