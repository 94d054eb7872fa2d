"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax NNX, loaded from a diffusers .safetensors file.

Images and latents are NHWC. `load_vae(path)` returns a `VAE` whose `encode` (images in [-1, 1] ->
unscaled mean and logvar) and `decode` (unscaled latents -> images) are jitted, compiled once per input
shape. To call the network inside your own jitted function, pass the parameters as an argument, so they
are not baked into the program as constants:

    decode = jax.jit(vae.decode_with)
    images = decode(vae.weights, latents / vae.scale_factor)

Sizes are read from the weights' shapes; only the GroupNorm group count cannot be and is an argument.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from dit.errors import UserError
from dit.files import sha256_of
from dit.layers import linear

# The only place the latent scale is defined. Callers multiply the VAE's latents by it before diffusion
# (so they have roughly unit variance) and divide by it before decode.
SCALE_FACTOR = 0.18215

HUB_FILENAME = "diffusion_pytorch_model.safetensors"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}
_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


class VAEError(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    dtype: str = "float32"  # compute dtype of convolutions and projections; parameters stay float32


class GroupNorm(nnx.Module):
    """GroupNorm with affine parameters, computed in float32 with torch's biased variance."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        self.groups = groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        return g.reshape(b, h, w, c) * self.scale[...] + self.bias[...]


def conv(cin: int, cout: int, rngs: nnx.Rngs, dtype, kernel: int = 3, stride: int = 1, padding=1) -> nnx.Conv:
    """A convolution with float32 parameters and `dtype` compute; `padding` as torch's (symmetric) or explicit."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride), padding=padding,
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class ResnetBlock(nnx.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv when the channel count changes)."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.norm1 = GroupNorm(cin, cfg.norm_num_groups)
        self.conv1 = conv(cin, cout, rngs, dtype)
        self.norm2 = GroupNorm(cout, cfg.norm_num_groups)
        self.conv2 = conv(cout, cout, rngs, dtype)
        self.conv_shortcut = conv(cin, cout, rngs, dtype, kernel=1, padding=0) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Attention(nnx.Module):
    """Single-head self-attention over all H*W positions, GroupNorm first, residual around it."""

    def __init__(self, channels: int, cfg: VAEConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.group_norm = GroupNorm(channels, cfg.norm_num_groups)
        self.to_q = linear(channels, channels, rngs, dtype)
        self.to_k = linear(channels, channels, rngs, dtype)
        self.to_v = linear(channels, channels, rngs, dtype)
        self.to_out = linear(channels, channels, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        q = q * jnp.asarray(c**-0.5, q.dtype)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out(jnp.einsum("bqk,bkc->bqc", weights, v))
        return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, cfg: VAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, rngs) for _ in range(2)])
        self.attention = Attention(channels, cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.resnets[1](self.attention(self.resnets[0](x)))


class DownBlock(nnx.Module):
    """Resnets, then (except in the last block) a stride-2 conv that halves the resolution."""

    def __init__(self, cin: int, cout: int, downsample: bool, cfg: VAEConfig, rngs: nnx.Rngs):
        n = cfg.layers_per_block
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs) for i in range(n)])
        # Padding (0, 1) on each axis, not (1, 1): the original LDM pads only bottom and right here.
        self.downsample = (conv(cout, cout, rngs, jnp.dtype(cfg.dtype), stride=2, padding=((0, 1), (0, 1)))
                           if downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsample(x) if self.downsample is not None else x


class UpBlock(nnx.Module):
    """Resnets (one more than the encoder's), then (except in the last block) nearest 2x upsampling and a conv."""

    def __init__(self, cin: int, cout: int, upsample: bool, cfg: VAEConfig, rngs: nnx.Rngs):
        n = cfg.layers_per_block + 1
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs) for i in range(n)])
        self.upsample = conv(cout, cout, rngs, jnp.dtype(cfg.dtype)) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        return x


class Encoder(nnx.Module):
    """Images -> mean and logvar of the latent distribution (2 * latent channels)."""

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        channels = cfg.block_out_channels
        self.conv_in = conv(cfg.in_channels, channels[0], rngs, dtype)
        self.down_blocks = nnx.List([
            DownBlock(channels[max(i - 1, 0)], c, i < len(channels) - 1, cfg, rngs) for i, c in enumerate(channels)
        ])
        self.mid_block = MidBlock(channels[-1], cfg, rngs)
        self.conv_norm_out = GroupNorm(channels[-1], cfg.norm_num_groups)
        self.conv_out = conv(channels[-1], 2 * cfg.latent_channels, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents -> images, through the channel counts of the encoder in reverse."""

    def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        channels = cfg.block_out_channels[::-1]
        self.conv_in = conv(cfg.latent_channels, channels[0], rngs, dtype)
        self.mid_block = MidBlock(channels[0], cfg, rngs)
        self.up_blocks = nnx.List([
            UpBlock(channels[max(i - 1, 0)], c, i < len(channels) - 1, cfg, rngs) for i, c in enumerate(channels)
        ])
        self.conv_norm_out = GroupNorm(channels[-1], cfg.norm_num_groups)
        self.conv_out = conv(channels[-1], cfg.out_channels, rngs, dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The network: encode(images) -> (mean, logvar), decode(latents) -> images, all NHWC float32."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs)
        self.quant_conv = conv(2 * latent, 2 * latent, rngs, dtype, kernel=1, padding=0)
        self.post_quant_conv = conv(latent, latent, rngs, dtype, kernel=1, padding=0)
        self.decoder = Decoder(cfg, rngs)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images in [-1, 1] -> unscaled latent mean and logvar (clipped to [-30, 20], as diffusers)."""
        moments = self.quant_conv(self.encoder(images.astype(jnp.float32))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents -> images, roughly in [-1, 1] (not clipped)."""
        return self.decoder(self.post_quant_conv(latents.astype(jnp.float32))).astype(jnp.float32)


# The graphdef is static (hashable): one compilation per graphdef and input shape.
@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array):
    return nnx.merge(graphdef, params).encode(images)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef: nnx.GraphDef, params: nnx.State, latents: jax.Array):
    return nnx.merge(graphdef, params).decode(latents)


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity: sampling programs are cached per VAE
class VAE:
    """A loaded VAE: the network split into graphdef and params, and where its weights came from; an
    autoencoder of `dit.autoencoder` (`scale_factor`: that of the latents it is used with)."""

    config: VAEConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    source: str | None  # the path or Hugging Face repo id; None for a state dict
    sha256: str | None  # of the weights file's bytes; None for a state dict
    scale_factor: float = SCALE_FACTOR

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel along a side (8 for the SD-VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def weights(self) -> nnx.State:
        return self.params

    @property
    def model(self) -> AutoencoderKL:
        return nnx.merge(self.graphdef, self.params)

    def encode_with(self, weights: nnx.State, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`encode` as a function of the weights, to call inside a jitted function."""
        return nnx.merge(self.graphdef, weights).encode(images)

    def decode_with(self, weights: nnx.State, latents: jax.Array) -> jax.Array:
        return nnx.merge(self.graphdef, weights).decode(latents)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, C) in [-1, 1] -> unscaled mean and logvar (B, H/f, W/f, latent channels)."""
        return _encode(self.graphdef, self.params, images)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent channels) -> images (B, h*f, w*f, C)."""
        return _decode(self.graphdef, self.params, latents)


def infer_config(shapes: Mapping[str, tuple], norm_num_groups: int = 32, dtype: str = "float32") -> VAEConfig:
    """The VAEConfig that a diffusers AutoencoderKL state dict's shapes (key -> shape) describe."""
    required = ("encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.conv_out.weight",
                "quant_conv.weight", "post_quant_conv.weight")
    missing = [k for k in required if k not in shapes]
    if missing:
        raise VAEError(
            f"these weights are not a diffusers AutoencoderKL: keys {', '.join(missing)} are missing (expected "
            f"the layout of shared/reference/sd-vae-ft-ema.diffusers.keys.tsv); give the "
            f"{HUB_FILENAME} of a diffusers VAE such as stabilityai/sd-vae-ft-ema."
        )
    num_blocks = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    layers = 1 + max(int(m.group(1)) for k in shapes
                     if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
    channels = []
    for i in range(num_blocks):
        key = f"encoder.down_blocks.{i}.resnets.0.conv1.weight"
        if key not in shapes:
            raise VAEError(f"the VAE weights lack {key}, so the width of down block {i} is unknown.")
        channels.append(shapes[key][0])
    bad = sorted({c for c in channels if c % norm_num_groups})
    if bad:
        raise VAEError(
            f"norm_num_groups={norm_num_groups} does not divide the VAE's channel counts {bad}; pass the "
            f"norm_num_groups of the VAE's config.json (32 for the Stable Diffusion VAEs)."
        )
    if dtype not in ("float32", "bfloat16"):
        raise VAEError(f"VAE dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'.")
    return VAEConfig(
        in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
        block_out_channels=tuple(channels), layers_per_block=layers,
        latent_channels=shapes["quant_conv.weight"][0] // 2, norm_num_groups=norm_num_groups, dtype=dtype,
    )


def param_shapes(cfg: VAEConfig) -> dict[tuple, tuple]:
    """Our parameters' paths and shapes for a config, without allocating them."""
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    return {path: var.shape for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _our_param(key: str, value: np.ndarray) -> tuple[tuple, np.ndarray]:
    """Our parameter path and value for one diffusers key (torch layouts become NHWC/HWIO and (in, out))."""
    key = re.sub(r"\.downsamplers\.0\.conv\.", ".downsample.", key)
    key = re.sub(r"\.upsamplers\.0\.conv\.", ".upsample.", key)
    key = key.replace(".attentions.0.", ".attention.").replace(".to_out.0.", ".to_out.")
    *module, leaf = key.split(".")
    module = [_OLD_ATTENTION_NAMES.get(m, m) for m in module]  # diffusers' names before 0.14
    path = tuple(int(p) if p.isdigit() else p for p in module)
    if leaf != "weight" or not module:
        return path + (leaf,), value
    if module[-1] in _ATTENTION_PROJECTIONS:
        # Old checkpoints hold the projections as 1x1 convolutions (out, in, 1, 1).
        return path + ("kernel",), value.reshape(value.shape[:2]).T if value.ndim == 4 else value.T
    if value.ndim == 4:
        return path + ("kernel",), value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return path + ("scale",), value  # a GroupNorm


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict[tuple, np.ndarray]:
    """Our parameters by path from a diffusers state dict; every key must be used and every parameter set."""
    expected = param_shapes(cfg)
    params, unexpected = {}, []
    for key, value in sd.items():
        path, array = _our_param(key, np.asarray(value))
        if path not in expected:
            unexpected.append(key)
            continue
        if expected[path] != array.shape:
            raise VAEError(
                f"VAE weight {key} has shape {tuple(value.shape)}, which does not fit the VAE its other "
                f"weights describe ({expected[path]} after conversion); the file is not a consistent AutoencoderKL."
            )
        params[path] = array
    if unexpected:
        raise VAEError(
            f"the VAE weights hold {len(unexpected)} keys that are not part of a diffusers AutoencoderKL, such as "
            f"{', '.join(sorted(unexpected)[:5])}; give an AutoencoderKL file (not a UNet or a whole pipeline)."
        )
    missing = sorted(".".join(map(str, p)) for p in set(expected) - set(params))
    if missing:
        raise VAEError(
            f"the VAE weights lack {len(missing)} of our parameters, such as {', '.join(missing[:5])}; the file is "
            f"truncated or not a diffusers AutoencoderKL."
        )
    return params


def vae_from_state_dict(sd: Mapping[str, np.ndarray], norm_num_groups: int = 32, dtype: str = "float32",
                        source: str | None = None, sha256: str | None = None) -> VAE:
    """A VAE from a diffusers AutoencoderKL state dict (key -> numpy array)."""
    cfg = infer_config({k: tuple(v.shape) for k, v in sd.items()}, norm_num_groups, dtype)
    params = convert_state_dict(sd, cfg)
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))  # shapes only: every value is replaced
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jnp.asarray(params[path], jnp.float32))
    graphdef, params_state = nnx.split(model)
    return VAE(cfg, graphdef, params_state, source, sha256)


def _hub_url(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}/resolve/main/{HUB_FILENAME}"


def _download(repo_id: str) -> Path:
    how = (f"download {_hub_url(repo_id)} (for example on a machine that is online) and pass the path of "
           f"that file instead.")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise VAEError(
            f"there is no file at {repo_id}, and loading it as a Hugging Face repo id needs huggingface_hub "
            f"(pip install 'dit-ablations[hub]'), which is not installed; install it, or {how}"
        ) from None
    try:
        return Path(hf_hub_download(repo_id, HUB_FILENAME))
    except Exception as e:  # offline, unknown repo, no such file: all end the same way for the user
        raise VAEError(f"there is no file at {repo_id}, and downloading it as a Hugging Face repo id failed "
                       f"({type(e).__name__}: {e}); {how}") from None


def load_vae(path, norm_num_groups: int = 32, dtype: str = "float32") -> VAE:
    """A VAE from a diffusers AutoencoderKL .safetensors file (or its folder), a Hugging Face repo id, or a
    dict of arrays.

    `norm_num_groups` is the config's (shapes cannot tell it); `dtype` ("float32" or "bfloat16") is the
    compute dtype of the convolutions and projections.
    """
    if isinstance(path, Mapping):
        return vae_from_state_dict(path, norm_num_groups, dtype)
    source = str(path)
    file = Path(path)
    if file.is_dir():  # a diffusers model folder, such as a pipeline's vae/
        file = file / HUB_FILENAME
    if not file.is_file():
        if Path(path).exists() or not _REPO_ID.fullmatch(source) or source.endswith(".safetensors"):
            raise VAEError(
                f"no VAE weights file at {file}; give the path of a diffusers AutoencoderKL {HUB_FILENAME} "
                f"or a Hugging Face repo id such as stabilityai/sd-vae-ft-ema."
            )
        file = _download(source)
    try:
        sd = load_file(file)
    except Exception as e:  # safetensors raises its own error type for files it cannot parse
        raise VAEError(f"could not read {file} as a .safetensors file ({e}); give a diffusers AutoencoderKL "
                       f"{HUB_FILENAME}.") from None
    return vae_from_state_dict(sd, norm_num_groups, dtype, source=source, sha256=sha256_of(file))
