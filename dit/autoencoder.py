"""The boundary between images and the diffusion model's space: the SD-VAE, or pixels for the demo.

An autoencoder maps images (float NHWC in [-1, 1]) to a diagonal Gaussian posterior, `encode -> (mean,
logvar)`, and latents back to images, `decode`. Latents are unscaled; the scale factor (0.18215 for
the SD-VAE, 1 for pixels) is recorded in the latent cache and applied by the data pipeline on the
way in and by `ScaledDecoder` on the way out.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx


class Autoencoder(Protocol):
    source: str  # a path or repo id, or "pixels"
    sha256: str | None  # of the weights file

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]: ...
    def decode(self, latents: jax.Array) -> jax.Array: ...


class PixelAutoencoder:
    """Identity: the diffusion model works on the images themselves (the built-in demo)."""

    source = "pixels"
    sha256 = None
    scale_factor = 1.0
    downsample = 1

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        # A posterior with zero variance: sampling from it gives the image back exactly.
        return images, jnp.full_like(images, -jnp.inf)

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents


class ScaledDecoder:
    """Model-space latents -> images: undoes the scale factor, then decodes (what sampling uses)."""

    def __init__(self, autoencoder: Autoencoder, scale_factor: float):
        self.autoencoder, self.scale_factor = autoencoder, scale_factor

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.autoencoder.decode(latents / self.scale_factor)


def as_function(coder, method: str) -> tuple[Callable, object]:
    """(fn(weights, x), weights): `coder.encode` or `.decode` as a pure function of its weights.

    Jitted callers pass the weights as an argument: a network closed over inside `jax.jit` would be
    baked into the program as constants (335 MB for the SD-VAE), slow to compile and held twice.
    """
    if isinstance(coder, ScaledDecoder):
        inner, weights = as_function(coder.autoencoder, "decode")
        scale = coder.scale_factor
        return (lambda w, latents: inner(w, latents / scale)), weights
    if hasattr(coder, "graphdef"):  # an NNX network: the SD-VAE
        graphdef = coder.graphdef
        return (lambda w, x: getattr(nnx.merge(graphdef, w), method)(x)), coder.params
    return (lambda w, x: getattr(coder, method)(x)), None  # weightless: the pixel identity


def autoencoder_from_source(source: str, sha256: str | None = None) -> Autoencoder:
    """'pixels', or an SD-VAE path or repo id; with `sha256`, the weights must be that file."""
    if source == "pixels":
        return PixelAutoencoder()
    from dit.errors import UserError
    from dit.vae import load_vae
    vae = load_vae(source)
    if sha256 and vae.sha256 and vae.sha256 != sha256:
        raise UserError(f"the VAE at {source} has SHA-256 {vae.sha256[:12]}..., but the latents were made with "
                        f"{sha256[:12]}...; decode with the same VAE file that encoded them.")
    return vae


def on_the_fly_scale_factor(source: str) -> float:
    """The scale factor of latents encoded during training by `source`: the SD-VAE's 0.18215, or 1 for
    pixels (a latent cache records its own)."""
    from dit.vae import SCALE_FACTOR
    return 1.0 if source == "pixels" else SCALE_FACTOR


def decoder_for(data_cfg, autoencoder: Autoencoder | None = None) -> ScaledDecoder:
    """How a run's samples become images: the autoencoder and scale factor recorded in its latent
    cache, or, for on-the-fly training, `data.vae` (or the `autoencoder` already loaded from it)."""
    if data_cfg.cache and not data_cfg.images:  # data.images (on the fly) wins, as in training
        from dit.data.cache import LatentCache
        manifest = LatentCache(data_cfg.cache).manifest
        autoencoder = autoencoder_from_source(manifest["autoencoder"]["source"], manifest["autoencoder"]["sha256"])
        return ScaledDecoder(autoencoder, float(manifest["scale_factor"]))
    autoencoder = autoencoder or autoencoder_from_source(data_cfg.vae)
    return ScaledDecoder(autoencoder, on_the_fly_scale_factor(data_cfg.vae))
