"""DINOv2 (Oquab et al.): the ViT with LayerScale behind REPA's targets, in Flax NNX, NHWC, loaded from the
Hugging Face `facebook/dinov2-base` safetensors layout.

`load_model(path)` reads `model.safetensors` (or its folder) and returns a `Dinov2` whose call maps
normalised images (B, S, S, 3) to the final-LayerNorm tokens (B, 1 + (S/14)^2, D), CLS first. Sizes are read
from the weights' shapes; the head count from a `config.json` beside them, else 64 channels per head (every
DINOv2 size has that).

The position embedding of the weights covers a 37x37 grid (518 pixels); the model runs at one input size
(`image_size`, 224 for REPA: 16x16 patches) and resamples the table to that grid once, when it is built or
loaded. Two recipes, both torch's bicubic written here as a matrix per axis:
  "transformers"  what transformers' Dinov2Model does per call (a=-0.75, to the output size, no antialias);
  "timm"          what REPA does once at load (timm's resample_abs_pos_embed: antialiased, a=-0.5 taps
                  widened by the scale); then the model never interpolates again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from dit.errors import UserError, check_weights
from dit.layers import layer_norm, linear, patchify

HUB_FILENAME = "model.safetensors"
HUB_URL = "https://huggingface.co/facebook/dinov2-base/resolve/main/model.safetensors"
POSITION_RESAMPLES = ("transformers", "timm")


class Dinov2Error(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """facebook/dinov2-base by default."""

    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    patch_size: int = 14
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    pretrained_grid: int = 37  # side of the weights' position-embedding grid (518 / 14)
    image_size: int = 224  # the input side the model runs at
    position_resample: str = "transformers"  # or "timm" (REPA's): see the module docstring
    dtype: str = "float32"  # compute dtype of the projections; parameters, norms and softmax stay float32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# ---------------------------------------------------------------------------------------------------------
# torch's bicubic interpolation (align_corners=False) as a (size_out, size_in) matrix per axis.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int, antialias: bool = False) -> np.ndarray:
    """(size_out, size_in) float32 weights of torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False, antialias=antialias) along one axis, output size given (not a scale factor).

    Without antialias: four taps around the source position, a=-0.75, indices clamped at the border (so a
    shrink aliases). With antialias (PIL's filter): a=-0.5, the kernel widened by the shrink factor, taps
    outside the image dropped and the rest renormalised.
    """
    # Source positions rounded to float32 as torch computes them (one rounding, like its fused multiply-add):
    # in float64 instead, a 256 -> 224 resize differs from torch's by 1e-4.
    scale = np.float32(size_in) / np.float32(size_out)
    centres = np.float64(scale) * (np.arange(size_out) + 0.5)
    weights = np.zeros((size_out, size_in), np.float64)
    if not antialias:
        src = (centres - 0.5).astype(np.float32)
        lo = np.floor(src).astype(np.int64)
        t = (src - lo.astype(np.float32)).astype(np.float64)
        rows = np.arange(size_out)
        for offset in (-1, 0, 1, 2):
            np.add.at(weights, (rows, np.clip(lo + offset, 0, size_in - 1)), _cubic(t - offset, -0.75))
        return weights.astype(np.float32)
    stretch = max(float(scale), 1.0)  # a shrink widens the kernel: that is the antialiasing
    for i, centre in enumerate(centres.astype(np.float32).astype(np.float64)):
        # int() truncates, as torch's cast does.
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), size_in)
        taps = np.arange(lo, hi)
        w = _cubic((taps - centre + 0.5) / stretch, -0.5)
        weights[i, lo:hi] = w / w.sum()
    return weights.astype(np.float32)


def resample_positions(table: jax.Array, grid: int, recipe: str = "transformers") -> jax.Array:
    """(1, 1 + g0^2, D) -> (1, 1 + grid^2, D): the CLS entry kept, the g0 x g0 patch grid resampled bicubically."""
    g0 = math.isqrt(table.shape[1] - 1)
    if g0 == grid:  # both recipes leave a table of the right size alone
        return table
    m = jnp.asarray(bicubic_matrix(g0, grid, antialias=recipe == "timm"))
    patches = table[0, 1:].reshape(g0, g0, -1).astype(jnp.float32)
    patches = jnp.einsum("oh,pw,hwd->opd", m, m, patches, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:, :1], patches.reshape(1, grid * grid, -1)], axis=1)


# ---------------------------------------------------------------------------------------------------------
# The network. Parameter names follow the Hugging Face keys (see `hf_key`).


class PositionTable(nnx.Variable):
    """The position embedding resampled to the input grid: derived from the weights, not trained."""


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps) * self.scale[...] + self.bias[...]


class LayerScale(nnx.Module):
    def __init__(self, dim: int):
        self.lambda1 = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.lambda1[...]


class Attention(nnx.Module):
    """Multi-head self-attention over all tokens, softmax in float32."""

    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        d, dtype = cfg.hidden_size, jnp.dtype(cfg.dtype)
        self.num_heads = cfg.num_heads
        self.query = linear(d, d, rngs, dtype)
        self.key = linear(d, d, rngs, dtype)
        self.value = linear(d, d, rngs, dtype)
        self.out = linear(d, d, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads = (b, n, self.num_heads, d // self.num_heads)
        q, k, v = (proj(x).reshape(heads) for proj in (self.query, self.key, self.value))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (d // self.num_heads) ** -0.5, axis=-1).astype(v.dtype)
        return self.out(jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d))


class Mlp(nnx.Module):
    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        self.fc1 = linear(cfg.hidden_size, cfg.mlp_hidden, rngs, jnp.dtype(cfg.dtype))
        self.fc2 = linear(cfg.mlp_hidden, cfg.hidden_size, rngs, jnp.dtype(cfg.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm attention and MLP, each scaled per channel (LayerScale) before the residual add."""

    def __init__(self, cfg: Dinov2Config, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attention = Attention(cfg, rngs)
        self.layer_scale1 = LayerScale(cfg.hidden_size)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = Mlp(cfg, rngs)
        self.layer_scale2 = LayerScale(cfg.hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.layer_scale1(self.attention(self.norm1(x)).astype(jnp.float32))
        return x + self.layer_scale2(self.mlp(self.norm2(x)).astype(jnp.float32))


class Dinov2(nnx.Module):
    """Normalised images (B, S, S, C), S = cfg.image_size -> final-LayerNorm tokens (B, 1 + (S/p)^2, D), CLS first."""

    def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
        if cfg.position_resample not in POSITION_RESAMPLES:
            raise Dinov2Error(f"position_resample {cfg.position_resample!r} is not one of {POSITION_RESAMPLES}.")
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = linear(cfg.patch_size**2 * cfg.in_channels, d, rngs, jnp.dtype(cfg.dtype))
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d)))
        self.mask_token = nnx.Param(jnp.zeros((1, d)))  # masked-image pretraining only; kept so every key loads
        self.position_embeddings = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, 1 + cfg.pretrained_grid**2, d)))
        self.positions = PositionTable(self.resampled_positions())
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
        self.layernorm = LayerNorm(d, cfg.layer_norm_eps)

    def resampled_positions(self) -> jax.Array:
        """The position embedding at the input grid, from the weights' table."""
        return resample_positions(self.position_embeddings[...], self.cfg.grid, self.cfg.position_resample)

    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, _ = images.shape
        p, g = self.cfg.patch_size, self.cfg.grid
        if h != w or h // p != g:
            raise Dinov2Error(f"this DINOv2 was built for {self.cfg.image_size}x{self.cfg.image_size} inputs (its "
                              f"position table is for that grid); got {h}x{w}. Build it with that image_size.")
        # The strided convolution as a linear map of patches; pixels past the last whole patch are dropped, as there.
        x = self.patch_embed(patchify(images[:, :g * p, :g * p], p)).astype(jnp.float32)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positions[...]
        for block in self.layers:
            x = block(x)
        return self.layernorm(x)

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """(B, (S/p)^2, D): the final-LayerNorm patch tokens (DINOv2's x_norm_patchtokens)."""
        return self(images)[:, 1:]


def count_params(cfg: Dinov2Config) -> int:
    """Parameters of a config (mask token and the weights' position table included), from shapes alone."""
    model = nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)))
    return sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------------------------------
# Weights: Hugging Face keys <-> our variables.

# Our module path -> the Hugging Face module path, first match wins.
_HF_MODULES = (
    (r"^patch_embed$", "embeddings.patch_embeddings.projection"),
    (r"^layers\.(\d+)\.attention\.out$", r"encoder.layer.\1.attention.output.dense"),
    (r"^layers\.(\d+)\.attention\.", r"encoder.layer.\1.attention.attention."),
    (r"^layers\.", "encoder.layer."),
)
_EMBEDDINGS = ("cls_token", "mask_token", "position_embeddings")
_REQUIRED = ("embeddings.cls_token", "embeddings.position_embeddings",
             "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.mlp.fc1.weight")


def hf_key(path: tuple) -> str:
    """The Hugging Face key of one of our parameters."""
    *module, leaf = map(str, path)
    if leaf in _EMBEDDINGS:
        return f"embeddings.{leaf}"
    name = ".".join(module)
    for pattern, replacement in _HF_MODULES:
        if re.match(pattern, name):
            name = re.sub(pattern, replacement, name)
            break
    return f"{name}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def _from_hf(path: tuple, value: np.ndarray, cfg: Dinov2Config) -> np.ndarray:
    if path == ("patch_embed", "kernel"):  # a (D, C, p, p) convolution as a linear map of patchify's patches
        return value.transpose(2, 3, 1, 0).reshape(cfg.patch_size**2 * cfg.in_channels, cfg.hidden_size)
    return value.T if path[-1] == "kernel" else value


def _to_hf_shape(path: tuple, shape: tuple, cfg: Dinov2Config) -> tuple:
    if path == ("patch_embed", "kernel"):
        return (cfg.hidden_size, cfg.in_channels, cfg.patch_size, cfg.patch_size)
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def hf_key_shapes(cfg: Dinov2Config) -> dict[str, tuple]:
    """Every key of a Hugging Face Dinov2Model's safetensors for a config, with its shape."""
    model = nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)))
    return {hf_key(p): _to_hf_shape(p, v.shape, cfg) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def infer_config(shapes: Mapping[str, tuple], num_heads: int | None = None, **overrides) -> Dinov2Config:
    """The Dinov2Config that a Hugging Face Dinov2Model's shapes describe; 64 channels per head unless told."""
    missing = [k for k in _REQUIRED if k not in shapes]
    if missing:
        raise Dinov2Error(
            f"these weights are not a Hugging Face DINOv2 (Dinov2Model): keys {', '.join(missing)} are missing. "
            f"Give facebook/dinov2-base's {HUB_FILENAME} ({HUB_URL}) or the folder holding it."
        )
    hidden = shapes["embeddings.cls_token"][-1]
    positions = shapes["embeddings.position_embeddings"][1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise Dinov2Error(f"the DINOv2 position embedding has {positions} patch entries, not a square grid; the "
                          f"file is not a plain DINOv2 (Dinov2Model) checkpoint.")
    projection = shapes["embeddings.patch_embeddings.projection.weight"]
    if len(projection) != 4 or projection[2] != projection[3]:
        raise Dinov2Error(f"the DINOv2 patch projection has shape {projection}, not a square convolution (width, "
                          f"channels, patch, patch); the file is not a plain DINOv2 (Dinov2Model) checkpoint.")
    _, channels, patch, _ = projection
    depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    heads = num_heads or max(hidden // 64, 1)
    if hidden % heads:
        raise Dinov2Error(f"{heads} attention heads do not divide the DINOv2 width {hidden}; pass num_heads (the "
                          f"num_attention_heads of the model's config.json).")
    return Dinov2Config(hidden_size=hidden, depth=depth, num_heads=heads,
                        mlp_hidden=shapes["encoder.layer.0.mlp.fc1.weight"][0], patch_size=patch,
                        in_channels=channels, pretrained_grid=grid, **overrides)


def check_state_dict(sd: Mapping[str, np.ndarray], cfg: Dinov2Config, source: str | None = None) -> None:
    """Every key of a Dinov2Model present with its shape, and no other."""
    where = f" in {source}" if source else ""
    check_weights(hf_key_shapes(cfg), sd, Dinov2Error,
                  f"the DINOv2 weights{where} are not a plain Dinov2Model (no registers, GELU MLP)",
                  f"Give facebook/dinov2-base's {HUB_FILENAME} ({HUB_URL}).")


def model_from_state_dict(sd: Mapping[str, np.ndarray], cfg: Dinov2Config, source: str | None = None) -> Dinov2:
    """A Dinov2 from a Hugging Face Dinov2Model state dict (key -> array); every key used, every parameter set."""
    check_state_dict(sd, cfg, source)
    model = nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0)))  # shapes only: every value is replaced
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(_from_hf(path, np.asarray(sd[hf_key(path)], np.float32), cfg)))
    model.positions.set_value(model.resampled_positions())
    return model


def weights_file(path) -> Path:
    """The safetensors file a path names: the file itself, or model.safetensors in a folder."""
    file = Path(path).expanduser()
    if file.is_dir():  # a Hugging Face model folder
        file = file / HUB_FILENAME
    if not file.is_file():
        raise Dinov2Error(
            f"no DINOv2 weights at {file}; download facebook/dinov2-base's {HUB_FILENAME} from {HUB_URL} and pass "
            f"its path or the folder holding it."
        )
    return file


def _config_json(file: Path) -> dict:
    """The model's config.json beside the weights ({} where there is none): the head count lives only there."""
    config = file.with_name("config.json")
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise Dinov2Error(f"could not read {config} as JSON ({e}); fix or remove it (without it the heads "
                          f"default to width / 64).") from None


def load_model(path, *, image_size: int = 224, position_resample: str = "transformers",
               num_heads: int | None = None, dtype: str = "float32") -> Dinov2:
    """A Dinov2 from a Hugging Face DINOv2 `model.safetensors` or its folder.

    `image_size` is the input side it will run at; `position_resample` how its position table is resampled
    to that grid ("transformers" or "timm", REPA's); `num_heads` overrides config.json (else width / 64).
    """
    file = weights_file(path)
    try:
        sd = load_file(file)
    except Exception as e:  # safetensors raises its own error type for files it cannot parse
        raise Dinov2Error(f"could not read {file} as a .safetensors file ({e}); give facebook/dinov2-base's "
                          f"{HUB_FILENAME} ({HUB_URL}).") from None
    if dtype not in ("float32", "bfloat16"):
        raise Dinov2Error(f"DINOv2 dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'.")
    config = _config_json(file)
    cfg = infer_config({k: tuple(v.shape) for k, v in sd.items()}, num_heads or config.get("num_attention_heads"),
                       layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)), image_size=image_size,
                       position_resample=position_resample, dtype=dtype)
    return model_from_state_dict(sd, cfg, str(file))
