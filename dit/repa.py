"""REPA (Yu et al., 2024): align a diffusion transformer's hidden tokens with a frozen DINOv2's patch tokens.

Three pieces, as sihyun-yu/REPA has them:
  load_dinov2(path)   the target encoder: `features(images)`, uint8 (B, 256, 256, 3) -> (B, 256, 768) float32,
                      preprocessed as REPA's `preprocess_raw_image` and loaded as its `load_encoders` does
                      (the position table resampled once to 16x16 with timm's antialiased bicubic);
  RepaProjector       REPA's `build_mlp`: Linear-SiLU-Linear-SiLU-Linear, hidden -> 2048 -> 2048 -> z_dim;
  repa_loss           REPA's projection loss: negative cosine similarity per token, mean over tokens, then batch.

`features` is jitted (one compile per batch size). Inside your own jitted function, call
`dinov2_features(nnx.merge(encoder.graphdef, state), images)` with the state passed as an argument.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit.dinov2 import Dinov2, Dinov2Config, Dinov2Error, bicubic_matrix, load_model, weights_file
from dit.files import sha256_of
from dit.layers import linear

# timm's IMAGENET_DEFAULT_MEAN and _STD, which REPA normalises with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_DIM = 2048


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (B, R, R, 3) -> float32 (B, S, S, 3), S = 224 * (R // 256): REPA's preprocess_raw_image for DINOv2.

    x / 255, ImageNet mean and std, then torch's bicubic resize (align_corners=False, no antialias), in that order.
    """
    _, h, w, _ = images.shape
    size = 224 * (h // 256)
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    rows, cols = bicubic_matrix(h, size), bicubic_matrix(w, size)
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST)


def dinov2_features(model: Dinov2, images: jax.Array) -> jax.Array:
    """uint8 (B, R, R, 3) -> REPA's targets: DINOv2's final-LayerNorm patch tokens (B, (S/14)^2, D) float32."""
    return model.patch_tokens(preprocess(images)).astype(jnp.float32)


# The graphdef is static (hashable): one compilation per graphdef and input shape.
@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return dinov2_features(nnx.merge(graphdef, state), images)


@dataclasses.dataclass(frozen=True)
class RepaEncoder:
    """A loaded DINOv2 target encoder: the network split into graphdef and state, and its weights' file."""

    config: Dinov2Config
    graphdef: nnx.GraphDef
    state: nnx.State
    resolution: int  # the image side `features` takes
    source: str
    sha256: str

    @property
    def model(self) -> Dinov2:
        return nnx.merge(self.graphdef, self.state)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(tokens, dim) of one image's features: 224 / 14 patches a side for every 256 pixels."""
        return (self.resolution // 16) ** 2, self.config.hidden_size

    def features(self, images) -> jax.Array:
        """uint8 (B, R, R, 3), R the resolution -> (B, (R/16)^2, D) float32 patch tokens (B, 256, 768 at 256)."""
        shape, dtype = tuple(images.shape), jnp.dtype(images.dtype)
        if dtype != jnp.uint8 or len(shape) != 4 or shape[1:] != (self.resolution, self.resolution, 3):
            raise Dinov2Error(
                f"REPA's DINOv2 features take uint8 RGB images shaped (B, {self.resolution}, {self.resolution}, 3); "
                f"got {dtype} {shape}. Convert images in [-1, 1] with ((x + 1) * 127.5).round().clip(0, 255) as "
                f"uint8, and center-crop them to {self.resolution} (or load the encoder at another resolution)."
            )
        return _features(self.graphdef, self.state, jnp.asarray(images))


def load_dinov2(path, resolution: int = 256, dtype: str = "float32") -> RepaEncoder:
    """REPA's DINOv2 target encoder from facebook/dinov2-base's `model.safetensors` (or its folder).

    `resolution` is the side of the images given to `features` (a multiple of 256; REPA resizes them to
    224 * resolution / 256); `dtype` "bfloat16" runs the projections in bfloat16 (REPA ran it under autocast).
    """
    if resolution < 256 or resolution % 256:
        raise Dinov2Error(f"REPA's DINOv2 takes images whose side is a multiple of 256 (it resizes them to "
                          f"224 * side / 256); got resolution {resolution}. Use 256 or 512.")
    file = weights_file(path)
    model = load_model(file, image_size=224 * (resolution // 256), position_resample="timm", dtype=dtype)
    graphdef, state = nnx.split(model)
    return RepaEncoder(model.cfg, graphdef, state, resolution, str(file), sha256_of(file))


class RepaProjector(nnx.Module):
    """REPA's build_mlp: (..., hidden) -> (..., z_dim) through two SiLU layers of width 2048; xavier init, zero bias."""

    def __init__(self, hidden_size: int, z_dim: int = 768, projector_dim: int = PROJECTOR_DIM, *,
                 rngs: nnx.Rngs, dtype: str = "float32"):
        dtype = jnp.dtype(dtype)
        self.fc1 = linear(hidden_size, projector_dim, rngs, dtype)
        self.fc2 = linear(projector_dim, projector_dim, rngs, dtype)
        self.fc3 = linear(projector_dim, z_dim, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(nnx.silu(self.fc2(nnx.silu(self.fc1(x)))))


def int8_directions(features: np.ndarray) -> np.ndarray:
    """(..., D) float features -> int8, each vector scaled so its largest entry is +-127: their directions,
    all REPA's loss sees, at a quarter of float32's bytes (ImageNet-100's 126,689 x 256 x 768: 24.9 GB, not
    49.8 in float16). The cosine of a stored to its true vector is about 1 - 3e-5 on Gaussian vectors."""
    features = np.asarray(features, np.float32)
    largest = np.maximum(np.abs(features).max(-1, keepdims=True), np.finfo(np.float32).tiny)
    return np.round(features * (127.0 / largest)).astype(np.int8)


def _unit(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) along the last axis, as torch's F.normalize (and no NaN gradient at zero)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.square(x).sum(-1, keepdims=True), eps * eps))


def repa_loss(projected: jax.Array, targets: jax.Array) -> jax.Array:
    """REPA's projection loss of (B, T, D) projected tokens against (B, T, D) targets: a float32 scalar in [-1, 1].

    Both L2-normalised per token; minus their dot product, averaged over tokens, then over the batch.
    """
    cosine = (_unit(projected.astype(jnp.float32)) * _unit(targets.astype(jnp.float32))).sum(-1)
    return -cosine.mean(-1).mean()
