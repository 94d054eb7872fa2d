"""The boundary between images and the diffusion model's space: the SD-VAE, or pixels for the demo.

An autoencoder maps images (float NHWC in [-1, 1]) to a diagonal Gaussian posterior, `encode -> (mean,
logvar)`, and latents back to images, `decode`; both on unscaled latents. Its `scale_factor` (0.18215
for the SD-VAE, 1 for pixels; a latent cache records the one it was made with) takes them to the model's
space: the data pipeline multiplies on the way in, sampling divides on the way out (`decode_scaled`).
Jitted callers use `encode_with(weights, images)` and `decode_with(weights, latents)` with the
autoencoder's `weights` as an argument: a network closed over inside `jax.jit` would be baked into the
program as constants (335 MB for the SD-VAE), slow to compile and held twice.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp

from dit.errors import UserError
from dit.vae import load_vae


class Autoencoder(Protocol):
    """What training, sampling and extraction use: `PixelAutoencoder` below, or the SD-VAE (`dit.vae.VAE`)."""

    source: str  # a path or repo id, or "pixels"
    sha256: str | None  # of the weights file
    scale_factor: float  # model-space latents = scale_factor x the encoder's latents
    downsample: int  # image pixels per latent pixel along a side
    latent_channels: int
    weights: object  # what encode_with and decode_with take (None: weightless)

    def encode_with(self, weights, images: jax.Array) -> tuple[jax.Array, jax.Array]: ...
    def decode_with(self, weights, latents: jax.Array) -> jax.Array: ...
    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]: ...
    def decode(self, latents: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class PixelAutoencoder:
    """Identity: the diffusion model works on the images themselves (the built-in demo)."""

    scale_factor: float = 1.0
    source: ClassVar[str] = "pixels"
    sha256: ClassVar[None] = None
    downsample: ClassVar[int] = 1
    latent_channels: ClassVar[int] = 3
    weights: ClassVar[None] = None

    def encode_with(self, weights, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        # A posterior with zero variance: sampling from it gives the image back exactly.
        return images, jnp.full_like(images, -jnp.inf)

    def decode_with(self, weights, latents: jax.Array) -> jax.Array:
        return latents

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_with(self.weights, images)

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.decode_with(self.weights, latents)


def decode_scaled(autoencoder: Autoencoder, weights, latents: jax.Array) -> jax.Array:
    """Model-space latents -> images: undoes the scale factor, then decodes (what sampling does)."""
    return autoencoder.decode_with(weights, latents / autoencoder.scale_factor)


def to_uint8(images) -> jax.Array:
    """[-1, 1] -> uint8 as DiT's sampler does (127.5 x + 128, clipped, truncated)."""
    return jnp.clip(127.5 * jnp.asarray(images, jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


def from_uint8(images) -> jax.Array:
    """uint8 -> float32 in [-1, 1]: what the autoencoders encode and the digits classifier reads."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def load_autoencoder(source: str, sha256: str | None = None, scale_factor: float | None = None,
                     dtype: str = "float32") -> Autoencoder:
    """'pixels', or an SD-VAE path or repo id (with `sha256`, the weights must be that file), with the scale
    factor of the latents it is used with (default: its own)."""
    if source == "pixels":
        return PixelAutoencoder(1.0 if scale_factor is None else scale_factor)
    vae = load_vae(source, dtype=dtype)
    if sha256 and vae.sha256 and vae.sha256 != sha256:
        raise UserError(f"the VAE at {source} has SHA-256 {vae.sha256[:12]}..., but the latents were made with "
                        f"{sha256[:12]}...; decode with the same VAE file that encoded them.")
    return vae if scale_factor is None else dataclasses.replace(vae, scale_factor=scale_factor)
