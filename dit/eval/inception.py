"""pytorch-fid's Inception-v3 (the network behind FID) in Flax NNX, NHWC, loaded from pytorch-fid's weights.

`load_inception(path)` reads `pt_inception-2015-12-05-6726825d.pth` (needs torch) or the .safetensors copy
that `python -m dit.eval.convert_inception` makes of it (no torch). The returned `Inception` has

    features(images)            uint8 (N, H, W, 3) -> (N, 2048) float32 pool3 features, for FID
    logits(images)              uint8 (N, H, W, 3) -> (N, 1008) float32 fc outputs, for Inception Score
    features_and_logits(images) both from one pass

Images of any size are resized to 299x299 exactly as pytorch-fid does (torch's bilinear interpolation with
align_corners=False, which does not antialias when it shrinks) and scaled to [-1, 1]. The network is
pytorch-fid's `fid_inception_v3`: torchvision's Inception3 with the blocks of the TensorFlow graph the FID
weights come from (average pools that do not count padding, a max pool in the last block).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import urllib.request
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit.errors import UserError, check_weights
from dit.files import sha256_of
from dit.mesh import batch_sharded, data_mesh, replicated

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
SHA256_PREFIX = "6726825d"  # pytorch-fid names its weights by the first 8 hex digits of their SHA-256
DEFAULT_CACHE_DIR = Path("~/.cache/dit-ablations")
INPUT_SIZE = 299
FEATURES = 2048
CLASSES = 1008  # the TensorFlow graph's fc: 1000 ImageNet classes and 8 unused outputs
BN_EPS = 1e-3


class InceptionError(UserError):
    pass


# ---------------------------------------------------------------------------------------------------------
# The network. Module and attribute names are torchvision's, so each torch key names one of our variables.


class BatchNorm(nnx.Module):
    """Inference BatchNorm: the running statistics of the weights file, eps 0.001 as in torchvision's Inception."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        shift = self.bias[...] - self.mean[...] * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nnx.Module):
    """torchvision's BasicConv2d: convolution without bias, BatchNorm, ReLU. Kernel and padding as torch's."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, dtype, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        # float32 convolutions at full precision: on GPUs and TPUs the default would round inputs to tf32/bf16.
        precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
        self.conv = nnx.Conv(cin, cout, kernel_size=_pair(kernel), strides=_pair(stride),
                             padding=((ph, ph), (pw, pw)), use_bias=False, dtype=dtype,
                             param_dtype=jnp.float32, precision=precision, rngs=rngs)
        self.bn = BatchNorm(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    """3x3 max pool; torch's floor mode is VALID windows, and padding never wins (-inf)."""
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


def avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 average pool, stride 1, padding 1, averaging over real pixels only, as TensorFlow does.

    This is pytorch-fid's count_include_pad=False; torchvision's own blocks count the padding.
    """
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nnx.Module):
    """Mixed_5b/5c/5d (pytorch-fid's FIDInceptionA)."""

    def __init__(self, cin: int, pool_features: int, *, dtype, rngs: nnx.Rngs):
        c = functools.partial(BasicConv, dtype=dtype, rngs=rngs)
        self.branch1x1 = c(cin, 64, 1)
        self.branch5x5_1 = c(cin, 48, 1)
        self.branch5x5_2 = c(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
        self.branch_pool = c(cin, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_same(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a: halves the resolution (35 -> 17)."""

    def __init__(self, cin: int, *, dtype, rngs: nnx.Rngs):
        c = functools.partial(BasicConv, dtype=dtype, rngs=rngs)
        self.branch3x3 = c(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool(x, stride=2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b..6e (pytorch-fid's FIDInceptionC): factorised 7x7 convolutions as 1x7 and 7x1."""

    def __init__(self, cin: int, c7: int, *, dtype, rngs: nnx.Rngs):
        c = functools.partial(BasicConv, dtype=dtype, rngs=rngs)
        self.branch1x1 = c(cin, 192, 1)
        self.branch7x7_1 = c(cin, c7, 1)
        self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = c(cin, c7, 1)
        self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return jnp.concatenate([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool_same(x))], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a: halves the resolution (17 -> 8)."""

    def __init__(self, cin: int, *, dtype, rngs: nnx.Rngs):
        c = functools.partial(BasicConv, dtype=dtype, rngs=rngs)
        self.branch3x3_1 = c(cin, 192, 1)
        self.branch3x3_2 = c(192, 320, 3, stride=2)
        self.branch7x7x3_1 = c(cin, 192, 1)
        self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = c(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b (average pool, FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2)."""

    def __init__(self, cin: int, pool: str, *, dtype, rngs: nnx.Rngs):
        c = functools.partial(BasicConv, dtype=dtype, rngs=rngs)
        self.pool = pool
        self.branch1x1 = c(cin, 320, 1)
        self.branch3x3_1 = c(cin, 384, 1)
        self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = c(cin, 448, 1)
        self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The TensorFlow graph behind the FID weights max-pools in its last block (likely a bug there, kept
        # because the FID numbers everyone reports depend on it).
        pooled = max_pool(x, stride=1, padding=1) if self.pool == "max" else avg_pool_same(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """Images (B, 299, 299, 3) in [-1, 1] -> pool3 features (B, 2048) and fc logits (B, 1008), float32."""

    def __init__(self, dtype=jnp.float32, *, rngs: nnx.Rngs):
        c = functools.partial(BasicConv, dtype=dtype, rngs=rngs)
        self.dtype = dtype
        self.Conv2d_1a_3x3 = c(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = c(32, 32, 3)
        self.Conv2d_2b_3x3 = c(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = c(64, 80, 1)
        self.Conv2d_4a_3x3 = c(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, dtype=dtype, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, dtype=dtype, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, dtype=dtype, rngs=rngs)
        self.Mixed_6a = InceptionB(288, dtype=dtype, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, dtype=dtype, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, dtype=dtype, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, dtype=dtype, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, dtype=dtype, rngs=rngs)
        self.Mixed_7a = InceptionD(768, dtype=dtype, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, "avg", dtype=dtype, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, "max", dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(FEATURES, CLASSES, precision=jax.lax.Precision.HIGHEST, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = max_pool(x, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        features = x.astype(jnp.float32).mean(axis=(1, 2))
        return features, self.fc(features)


# ---------------------------------------------------------------------------------------------------------
# Input: torch's bilinear resize, as a matrix per axis.


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of torch's bilinear interpolation along one axis, align_corners=False.

    Each output pixel mixes the two input pixels around its centre, whatever the scale: unlike
    jax.image.resize (which widens its kernel when shrinking, i.e. antialiases), torch does not.
    The weights are rounded as torch's kernel rounds them (float32, a fused multiply-add for the source
    position): computed in float64 instead, they differ by up to 5e-5 of the pixel range.
    """
    scale = np.float32(size_in) / np.float32(size_out)
    centres = np.arange(size_out, dtype=np.float32) + np.float32(0.5)
    # scale * centre - 0.5 rounded once, like an FMA: the float64 product of two float32s is exact.
    src = np.maximum((np.float64(scale) * centres - 0.5).astype(np.float32), np.float32(0.0))
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo.astype(np.float32)
    rows = np.arange(size_out)
    weights = np.zeros((size_out, size_in), np.float32)
    np.add.at(weights, (rows, lo), np.float32(1.0) - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


@jax.jit
def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 (B, 299, 299, 3) in [-1, 1], as pytorch-fid (x/255, resize, 2x - 1)."""
    x = images.astype(jnp.float32) / 255.0
    rows = resize_matrix(x.shape[1], INPUT_SIZE)
    cols = resize_matrix(x.shape[2], INPUT_SIZE)
    x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum("pw,bowc->bopc", cols, x, precision=jax.lax.Precision.HIGHEST)
    return 2.0 * x - 1.0


# The graphdef is static (hashable): one compilation per graphdef and batch size, whatever the image size.
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return nnx.merge(graphdef, state)(x)


@dataclasses.dataclass(frozen=True)
class Inception:
    """A loaded FID Inception: the network split into graphdef and state, and where its weights came from."""

    graphdef: nnx.GraphDef
    state: nnx.State
    source: str | None  # the file read; None for a state dict
    sha256: str | None  # of that file's bytes; None for a state dict
    dtype: str = "float32"

    @functools.cached_property
    def _placed(self) -> tuple[jax.sharding.Mesh, nnx.State]:
        # One copy of the weights on every local device, made once: each process embeds its own images.
        mesh = data_mesh(jax.local_devices())
        return mesh, jax.device_put(self.state, replicated(mesh))

    def features_and_logits(self, images, batch_size: int = 200,
                            progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3), any H and W -> pool3 features (N, 2048) and logits (N, 1008), float32 numpy.

        Runs `batch_size` images at a time over the local devices; `progress` shows a tqdm bar
        (None: only when there are more than 10 batches).
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InceptionError(
                f"Inception features need uint8 RGB images shaped (N, H, W, 3); got {images.dtype} "
                f"{images.shape}. Convert float images in [0, 1] with (x * 255).round().clip(0, 255).astype(uint8)."
            )
        if batch_size < 1:
            raise InceptionError(f"batch_size must be a positive integer; got {batch_size}.")
        mesh, state = self._placed
        devices = mesh.devices.size
        n = len(images)
        bar = _progress_bar(n, progress if progress is not None else n > 10 * batch_size)
        features, logits = [np.zeros((0, FEATURES), np.float32)], [np.zeros((0, CLASSES), np.float32)]
        pending = None

        def collect(outputs, rows):
            features.append(np.asarray(outputs[0])[:rows])
            logits.append(np.asarray(outputs[1])[:rows])
            if bar is not None:
                bar.update(rows)

        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            rows = len(chunk)
            pad = -rows % devices  # every device gets the same number of rows; the padding is dropped
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
            outputs = _forward(self.graphdef, state, preprocess(jax.device_put(chunk, batch_sharded(mesh))))
            # Fetch the previous batch only now, so the device works on this one meanwhile.
            if pending is not None:
                collect(*pending)
            pending = outputs, rows
        if pending is not None:
            collect(*pending)
        if bar is not None:
            bar.close()
        return np.concatenate(features), np.concatenate(logits)

    def features(self, images, batch_size: int = 200, progress: bool | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) -> pool3 features (N, 2048) float32, the input of FID."""
        return self.features_and_logits(images, batch_size, progress)[0]

    def logits(self, images, batch_size: int = 200, progress: bool | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) -> fc logits (N, 1008) float32, the input of the Inception Score."""
        return self.features_and_logits(images, batch_size, progress)[1]


def _progress_bar(total: int, show: bool):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="inception")


# ---------------------------------------------------------------------------------------------------------
# Weights: torch keys <-> our variables.

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}


def _torch_key(path: tuple) -> str:
    return ".".join(map(str, path[:-1] + (_LEAF_TO_TORCH[path[-1]],)))


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    if path[-1] == "kernel":
        return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _from_torch(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> HWIO
    return value


def _abstract_model(dtype: str = "float32") -> InceptionV3:
    return nnx.eval_shape(lambda: InceptionV3(jnp.dtype(dtype), rngs=nnx.Rngs(0)))


@functools.cache
def _key_shapes() -> tuple[tuple[str, tuple], ...]:
    return tuple((_torch_key(path), _torch_shape(path, var.shape))
                 for path, var in nnx.to_flat_state(nnx.state(_abstract_model())))


def torch_key_shapes() -> dict[str, tuple]:
    """Every key of pytorch-fid's weights file (except num_batches_tracked) and its torch shape."""
    return dict(_key_shapes())


def check_state_dict(sd: Mapping[str, np.ndarray], source: str | None = None) -> dict[str, np.ndarray]:
    """pytorch-fid's state dict as float32 arrays, num_batches_tracked dropped; every key known, none missing."""
    expected = torch_key_shapes()
    given = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    where = f" in {source}" if source else ""
    check_weights(expected, given, InceptionError, f"the Inception weights{where} are not pytorch-fid's FID Inception",
                  f"Give {FID_WEIGHTS_NAME} (from {FID_WEIGHTS_URL}) or its converted .safetensors copy.")
    return {key: np.asarray(given[key], np.float32) for key in expected}


def inception_from_state_dict(sd: Mapping[str, np.ndarray], dtype: str = "float32", source: str | None = None,
                              sha256: str | None = None) -> Inception:
    """An Inception from pytorch-fid's state dict (torch key -> array); every key used, every variable set."""
    if dtype not in ("float32", "bfloat16"):
        raise InceptionError(f"Inception dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'.")
    sd = check_state_dict(sd, source)
    model = _abstract_model(dtype)  # shapes only: every value is replaced
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(_from_torch(path, sd[_torch_key(path)])))
    nnx.update(model, state)
    graphdef, state = nnx.split(model)
    return Inception(graphdef, state, source, sha256, dtype)


# ---------------------------------------------------------------------------------------------------------
# Files: reading, and downloading pytorch-fid's weights into the cache.


def _where_to_get_it(cache_dir: Path) -> str:
    return (f"download pytorch-fid's {FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL} and either pass its path or put "
            f"it in {cache_dir}/ (the default when the path is None or 'pt_inception')")


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """pytorch-fid's weights as float32 numpy arrays by torch key, from the .pth or a converted .safetensors."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error type for files it cannot parse
            raise InceptionError(f"could not read {path} as a .safetensors file ({e}); give {FID_WEIGHTS_NAME} "
                                 f"or its converted copy.") from None
    if path.suffix not in (".pth", ".pt"):
        raise InceptionError(f"{path} is neither a .pth nor a .safetensors file; give {FID_WEIGHTS_NAME} or "
                             f"the .safetensors that python -m dit.eval.convert_inception makes of it.")
    try:
        import torch
    except ImportError:
        raise InceptionError(
            f"reading {path} needs PyTorch, which is not installed. Convert it once on a machine with torch "
            f"(python -m dit.eval.convert_inception --pth {path} --out {path.with_suffix('.safetensors')}) and "
            f"pass the .safetensors, or install torch (pip install torch)."
        ) from None
    try:
        # weights_only: tensors and plain containers only, no pickled code is executed.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionError(f"could not read {path} with torch.load ({type(e).__name__}: {e}); the file is "
                             f"damaged or not a PyTorch state dict. Download {FID_WEIGHTS_URL} again.") from None
    if not isinstance(raw, Mapping):
        raise InceptionError(f"{path} holds a {type(raw).__name__}, not a state dict; give {FID_WEIGHTS_NAME}.")
    return {k: v.detach().cpu().float().numpy() for k, v in raw.items() if hasattr(v, "detach")}


def _fetch(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def _download(dest: Path) -> None:
    """pytorch-fid's weights into `dest`, checked against the SHA-256 prefix in their name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        _fetch(FID_WEIGHTS_URL, partial)
    except OSError as e:  # offline, DNS, HTTP errors (urllib's URLError is an OSError)
        partial.unlink(missing_ok=True)
        raise InceptionError(f"could not download the FID Inception weights ({type(e).__name__}: {e}); "
                             f"{_where_to_get_it(dest.parent)}.") from None
    digest = sha256_of(partial)
    if not digest.startswith(SHA256_PREFIX):
        partial.unlink()
        raise InceptionError(
            f"the downloaded {FID_WEIGHTS_NAME} has SHA-256 {digest[:16]}..., which does not start with "
            f"{SHA256_PREFIX}: the download is damaged or not pytorch-fid's file. Try again, or "
            f"{_where_to_get_it(dest.parent)}."
        )
    partial.replace(dest)


def load_inception(path=None, *, dtype: str = "float32", cache_dir: Path | str | None = None) -> Inception:
    """The FID Inception from pytorch-fid's .pth, its converted .safetensors, or a state dict of arrays.

    With path None or "pt_inception", the file is `cache_dir/pt_inception-2015-12-05-6726825d.pth`
    (default ~/.cache/dit-ablations), downloaded there when it is missing and the machine is online.
    `dtype` "bfloat16" runs the convolutions in bfloat16 (for accelerators; FID numbers are float32's).
    """
    if isinstance(path, Mapping):
        return inception_from_state_dict(path, dtype)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    if path is None or str(path) == "pt_inception":
        file = cache / FID_WEIGHTS_NAME
        if not file.is_file():
            _download(file)
        digest = sha256_of(file)
        if not digest.startswith(SHA256_PREFIX):
            raise InceptionError(f"{file} has SHA-256 {digest[:16]}..., not {SHA256_PREFIX}...: it is not "
                                 f"pytorch-fid's file. Delete it; it will be downloaded again when online.")
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise InceptionError(f"no Inception weights at {file}; {_where_to_get_it(cache)}.")
        digest = sha256_of(file)
    return inception_from_state_dict(read_state_dict(file), dtype, source=str(file), sha256=digest)
