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
