"""The pieces of a DiT around attention: embedders, norms, MLPs and the official initialisers."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

xavier_uniform = nnx.initializers.xavier_uniform()
normal_002 = nnx.initializers.normal(stddev=0.02)
zeros = nnx.initializers.zeros


def linear(in_features: int, out_features: int, rngs: nnx.Rngs, dtype, init=xavier_uniform, bias=True) -> nnx.Linear:
    """A linear layer with float32 parameters, `dtype` compute and DiT's default (xavier-uniform) init."""
    return nnx.Linear(
        in_features, out_features, use_bias=bias, kernel_init=init, bias_init=zeros,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
    )


def weight_product(x: jax.Array, w: jax.Array, axes: int = 1) -> jax.Array:
    """x's last `axes` axes contracted with w's first ones: (..., *in) x (*in, *out) -> (..., *out).

    The products of the tokens with a block's weights. On the CPU the backward is written out
    (_cpu_weight_product); on accelerators it is autodiff's (the v3-8 cost model's step as with jnp.einsum).
    """
    return jax.lax.platform_dependent(x, w, cpu=functools.partial(_cpu_weight_product, axes=axes),
                                      default=functools.partial(jnp.tensordot, axes=axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_weight_product(x: jax.Array, w: jax.Array, axes: int) -> jax.Array:
    """weight_product with the weight's gradient as one product over all the tokens, (tokens, in)^T x
    (tokens, out), of the arrays as the forward and the backward leave them.

    For autodiff's gradient of the same product, XLA's CPU backend copied the qkv product's gradient
    into the transposed layout before its weight product (9.4 MB a block) and ran the MLP's weight
    products in Eigen's path for two transposed operands (65-77 GFLOP/s on this project's CPU, against
    about 100 for the others). DiT-S/2 at batch 8, float32, profiled on one core (2026-12-08): copies and
    transposes 250 -> 55 ms a step, the step 4.2 -> 3.9 s; on two cores about 9% less (alternated runs).
    """
    return jnp.tensordot(x, w, axes=axes)


def _cpu_weight_product_fwd(x, w, axes):
    # The product itself: calling the custom_vjp function here made dit.aot's traced FLOP count of the
    # step 1.31x the model's (tests/test_aot.py, 2026-12-08).
    return jnp.tensordot(x, w, axes=axes), (x, w)


def _cpu_weight_product_bwd(axes, residuals, d_out):
    x, w = residuals
    n_in = math.prod(w.shape[:axes])
    w_rows = w.reshape(n_in, -1)
    d_rows = d_out.reshape(-1, w_rows.shape[1])
    d_x = (d_rows @ w_rows.T).reshape(x.shape)
    d_w = (x.reshape(-1, n_in).T @ d_rows).reshape(w.shape)
    return d_x, d_w


_cpu_weight_product.defvjp(_cpu_weight_product_fwd, _cpu_weight_product_bwd)


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """layer(x) through weight_product: x, the kernel and the bias cast to the layer's dtype as nnx.Linear does."""
    dtype = layer.dtype or x.dtype
    y = weight_product(x.astype(dtype), layer.kernel[...].astype(dtype))
    return y if layer.bias is None else y + layer.bias[...].astype(dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32 (biased variance, as torch).

    The variance is E[x^2] - E[x]^2 (Flax's LayerNorm default, `use_fast_variance`): both sums come from
    one read of x, which XLA fuses into the operation that writes x, where E[(x - E[x])^2] needs a second
    pass over x once its mean is known. The cancellation's relative error in the variance is about
    1e-7 x (mean / standard deviation)^2 in float32: 1e-5 for a token whose mean is 10x its spread.
    """
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm without affine parameters, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over channels in float32, optionally times a learned per-channel weight (init 1).

    DiT's norms have no affine parameters (adaLN supplies the scale); LightningDiT's RMSNorm keeps the weight.
    """

    def __init__(self, kind: str, size: int, weight: bool = False):
        self.normalize = rms_norm if kind == "rmsnorm" else layer_norm
        self.weight = nnx.Param(jnp.ones((size,), jnp.float32)) if weight else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.normalize(x)
        return x if self.weight is None else x * self.weight[...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def round_gradient(x: jax.Array, dtype) -> jax.Array:
    """x itself; in the backward pass the gradient flowing into x is rounded to `dtype` (and kept in x's dtype)."""
    return x


def _round_gradient_fwd(x, dtype):
    return x, None


def _round_gradient_bwd(dtype, _, gradient):
    return (gradient.astype(dtype).astype(gradient.dtype),)


round_gradient.defvjp(_round_gradient_fwd, _round_gradient_bwd)


def modulate(x: jax.Array, shift: jax.Array | None, scale: jax.Array) -> jax.Array:
    """adaLN: per-example shift and scale broadcast over tokens (no shift: LightningDiT's wo_shift)."""
    x = x * (1 + scale[:, None, :])
    return x if shift is None else x + shift[:, None, :]


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps: cosines first, then sines, as DiT."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=None)
def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2D sin-cos position embedding, (grid_size**2, dim) float32, tokens in row-major order.

    The first half of each vector encodes the column and the second half the row (the official code's
    meshgrid puts width first), so imported checkpoints keep their meaning.
    """
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")
    embedding = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return embedding.astype(np.float32)


class TimestepEmbedder(nnx.Module):
    """Timesteps -> 256 sinusoidal frequencies -> Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, rngs: nnx.Rngs, dtype, frequency_size: int = 256):
        self.frequency_size = frequency_size
        self.mlp_in = linear(frequency_size, hidden_size, rngs, dtype, init=normal_002)
        self.mlp_out = linear(hidden_size, hidden_size, rngs, dtype, init=normal_002)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.mlp_out(nnx.silu(self.mlp_in(timestep_embedding(t, self.frequency_size))))


class LabelEmbedder(nnx.Module):
    """Class labels -> vectors, with one extra row for the null label (index num_classes) used by guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nnx.Embed(num_classes + 1, hidden_size, embedding_init=normal_002, rngs=rngs)

    def drop(self, labels: jax.Array, dropout_key: jax.Array) -> jax.Array:
        """Labels with each replaced by the null label with probability dropout_prob."""
        # Label dropout trains the unconditional model that classifier-free guidance needs.
        if self.dropout_prob == 0:
            return labels
        drop = jax.random.bernoulli(dropout_key, self.dropout_prob, labels.shape)
        return jnp.where(drop, self.num_classes, labels)

    def __call__(self, labels: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        if dropout_key is not None:
            labels = self.drop(labels, dropout_key)
        return self.embedding_table(labels)


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), tokens row-major, each patch flattened as (row, col, channel)."""
    b, h, w, c = x.shape
    p = patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """(B, T, p*p*C) -> (B, H, W, C); the inverse of `patchify` on a square grid."""
    b, t, _ = tokens.shape
    g = math.isqrt(t)
    p = patch_size
    x = tokens.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


class PatchEmbed(nnx.Module):
    """Patchify as one linear layer: the same map as DiT's strided convolution with kernel = stride = p."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, rngs: nnx.Rngs, dtype):
        self.patch_size = patch_size
        self.proj = linear(patch_size * patch_size * in_channels, hidden_size, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(patchify(x, self.patch_size))


class ConvStem(nnx.Module):
    """Two 3x3 convolutions (GELU between and after) before the linear patchify: a small local feature
    extractor in place of the single linear projection, at the same patch size."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, width: int, rngs: nnx.Rngs, dtype):
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding="SAME", kernel_init=xavier_uniform,
                                 dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.conv1 = conv(in_channels, width)
        self.conv2 = conv(width, width)
        self.patch = PatchEmbed(patch_size, width, hidden_size, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.gelu(self.conv1(x), approximate=True)
        x = nnx.gelu(self.conv2(x), approximate=True)
        return self.patch(x)


class GeluMlp(nnx.Module):
    """Linear-GELU(tanh)-Linear, as DiT."""

    def __init__(self, hidden_size: int, mlp_hidden: int, rngs: nnx.Rngs, dtype):
        self.fc1 = linear(hidden_size, mlp_hidden, rngs, dtype)
        self.fc2 = linear(mlp_hidden, hidden_size, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(self.fc2, nnx.gelu(dense(self.fc1, x), approximate=True))


class SwiGluMlp(nnx.Module):
    """SiLU(x W_gate) * (x W_value), then W_out: the gated MLP of LLaMA and LightningDiT."""

    def __init__(self, hidden_size: int, mlp_hidden: int, rngs: nnx.Rngs, dtype):
        self.fc1 = linear(hidden_size, 2 * mlp_hidden, rngs, dtype)  # gate and value in one product
        self.fc2 = linear(mlp_hidden, hidden_size, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, value = jnp.split(dense(self.fc1, x), 2, axis=-1)
        return dense(self.fc2, nnx.silu(gate) * value)
