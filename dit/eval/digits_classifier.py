"""The demo's feature network: a small CNN trained on the digits cache itself, for `fd_digits`.

FID's Inception means nothing on 8x8 digits (and is slow on a CPU), so the demo measures a Frechet
distance in the 64 features of a classifier of the digits instead. It is trained once per cache and
saved next to it:

    <cache_dir>/../classifier-<resolution>.npz   the parameters (one array per path) and `meta`, a JSON
                                                 string: architecture version, seed, accuracies and the
                                                 SHA-256 of the manifest.json it was trained on

`load_or_train` reuses that file while its meta matches the cache, and trains and replaces it otherwise.
The reference statistics are not cached: computing them takes well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dit.autoencoder import from_uint8, to_uint8
from dit.data.cache import MANIFEST, LatentCache
from dit.errors import UserError
from dit.eval.metrics import statistics
from dit.eval.reference import Reference
from dit.files import sha256_of

METRIC_NAME = "fd_digits"
ARCHITECTURE_VERSION = 1  # bump when the network or its training changes: saved classifiers are then retrained
FEATURES = 64
CLASSES = 10
HELD_OUT = 0.2
DEFAULT_STEPS = 200
DEFAULT_BATCH = 128
PEAK_LEARNING_RATE = 1e-2  # 200 steps of 128 reach 96-98% held-out accuracy over seeds 0-4, ~10 s on 2 CPU cores
WEIGHT_DECAY = 1e-4


class DigitsCNN(nnx.Module):
    """(H, W, 3) digits (8x8 in the presets) -> conv 32 -> conv/2 64 -> conv/2 128 -> mean pool -> 64 features
    -> 10 logits."""

    def __init__(self, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.conv1 = conv(3, 32)
        self.conv2 = conv(32, 64, strides=(2, 2))
        self.conv3 = conv(64, 128, strides=(2, 2))
        self.feature = nnx.Linear(128, FEATURES, rngs=rngs)
        self.head = nnx.Linear(FEATURES, CLASSES, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Images in [-1, 1] (N, H, W, 3) -> (N, 64), after the nonlinearity: what the head sees."""
        x = nnx.gelu(self.conv1(x))
        x = nnx.gelu(self.conv2(x))
        x = nnx.gelu(self.conv3(x))
        return nnx.gelu(self.feature(x.mean(axis=(1, 2))))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def manifest_sha256(cache_dir: str | Path) -> str:
    return sha256_of(Path(cache_dir) / MANIFEST)


def cache_images(cache: LatentCache) -> tuple[np.ndarray, np.ndarray]:
    """Every record as uint8: (N, 2, H, W, 3) with index 1 the mirror image, and the (N,) labels.

    The network is trained on these quantised values too: exactly what it will see of the samples.
    """
    images = np.asarray(to_uint8(np.stack([cache.record(i)[0] for i in range(len(cache))])))
    return images, np.asarray(cache.labels, np.int32)


def held_out_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a fixed 20% held out by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * HELD_OUT))
    return np.sort(order[cut:]), np.sort(order[:cut])


# The graphdef is static (hashable): one compilation per architecture and batch shape, reused across calls.
@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(from_uint8(images))


@functools.partial(jax.jit, static_argnums=0)
def _features_and_logits(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array) -> jax.Array:
    """(N, 64 features + 10 logits) from one pass."""
    model = nnx.merge(graphdef, params)
    features = model.features(from_uint8(images))
    return jnp.concatenate([features, model.head(features)], axis=-1)


def _batched(fn, graphdef: nnx.GraphDef, params: nnx.State, images: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over fixed-size batches (the last one zero-padded): one compilation for any number of images."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"the digits classifier needs uint8 RGB images shaped (N, H, W, 3); got {images.dtype} "
                        f"{images.shape}. Quantise images in [-1, 1] with dit.autoencoder.to_uint8.")
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        rows = len(chunk)
        if rows < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - rows, *chunk.shape[1:]), np.uint8)])
        outputs.append(np.asarray(fn(graphdef, params, chunk))[:rows])
    if not outputs:  # no images: the output's width still comes from the same compiled batch
        return np.asarray(fn(graphdef, params, np.zeros((batch_size, *images.shape[1:]), np.uint8)))[:0]
    return np.concatenate(outputs)


def accuracy(graphdef: nnx.GraphDef, params: nnx.State, images: np.ndarray, labels: np.ndarray) -> float:
    predictions = _batched(_logits, graphdef, params, images, 256).argmax(-1)
    return float((predictions == labels).mean())


def _optimizer() -> optax.GradientTransformation:
    # The learning rate is an input of the step, not baked into it: any `steps` reuses one compilation.
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=WEIGHT_DECAY)


def learning_rate(step: int, steps: int) -> float:
    """Linear warmup over the first 10% (at most 50 steps), then cosine decay to zero."""
    warmup = max(1, min(50, steps // 10))
    if step < warmup:
        return PEAK_LEARNING_RATE * (step + 1) / warmup
    return PEAK_LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _train_step(graphdef: nnx.GraphDef, params: nnx.State, opt_state, images: jax.Array, labels: jax.Array,
                lr: jax.Array):
    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(from_uint8(images))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    opt_state.hyperparams["learning_rate"] = lr
    updates, opt_state = _optimizer().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(cache_dir: str | Path, seed: int = 0, steps: int = DEFAULT_STEPS,
                     batch: int = DEFAULT_BATCH) -> tuple[nnx.State, dict]:
    """Trains the CNN on the cache's images (both flips) with AdamW; returns its parameters and a report.

    Deterministic for a seed on the CPU: the held-out split, the initialisation and the batch order all
    come from it. The report has `train_accuracy`, `heldout_accuracy` (unflipped held-out images, as the
    reference), `heldout_accuracy_flipped`, `steps`, `batch`, `seed` and `seconds`.
    """
    started = time.perf_counter()
    cache = LatentCache(cache_dir)
    images, labels = cache_images(cache)
    train, held_out = held_out_split(len(images), seed)
    # Both flips are training examples: the diffusion model is trained on both, so its samples show both.
    train_images = images[train].reshape(-1, *images.shape[2:])
    train_labels = np.repeat(labels[train], 2)
    graphdef, params = nnx.split(DigitsCNN(nnx.Rngs(seed)))
    opt_state = _optimizer().init(params)
    rng = np.random.default_rng(seed)
    order = np.zeros(0, np.int64)
    for step in range(steps):
        if len(order) < batch:  # epochs of a seeded permutation: every example seen once per epoch
            order = np.concatenate([order, rng.permutation(len(train_images))])
        rows, order = order[:batch], order[batch:]
        lr = np.float32(learning_rate(step, steps))
        params, opt_state, _ = _train_step(graphdef, params, opt_state, train_images[rows], train_labels[rows], lr)
    report = {
        "train_accuracy": accuracy(graphdef, params, images[train, 0], labels[train]),
        "heldout_accuracy": accuracy(graphdef, params, images[held_out, 0], labels[held_out]),
        "heldout_accuracy_flipped": accuracy(graphdef, params, images[held_out, 1], labels[held_out]),
        "steps": steps, "batch": batch, "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    return jax.device_get(params), report


@dataclass(frozen=True)
class DigitsClassifier:
    """A trained digits CNN, split into graphdef and parameters, and the file it was saved in."""

    graphdef: nnx.GraphDef
    params: nnx.State
    path: Path
    sha256: str  # of the saved weights file
    meta: dict

    @property
    def accuracy(self) -> float:
        """Held-out accuracy (unflipped images) measured when it was trained."""
        return float(self.meta["heldout_accuracy"])

    def features_and_logits(self, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) -> the (N, 64) features `fd_digits` compares and the (N, 10) logits, float32."""
        both = _batched(_features_and_logits, self.graphdef, self.params, images, batch_size)
        return both[:, :FEATURES], both[:, FEATURES:]

    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> (N, 64) float32: the features `fd_digits` compares."""
        return self.features_and_logits(images, batch_size)[0]

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, 3) -> (N,) predicted digits."""
        return self.features_and_logits(images, batch_size)[1].argmax(-1)


def classifier_path(cache_dir: str | Path) -> Path:
    cache = LatentCache(cache_dir)
    return Path(cache_dir).resolve().parent / f"classifier-{cache.latent_shape[0]}.npz"


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def save_classifier(path: Path, params: nnx.State, meta: dict) -> None:
    """Writes the parameters and meta atomically (a temporary file, then renamed into place)."""
    arrays = {_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


def load_classifier(path: str | Path) -> DigitsClassifier:
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        model = nnx.eval_shape(lambda: DigitsCNN(nnx.Rngs(0)))  # shapes only: every value is replaced
        for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            var.set_value(jnp.asarray(data[_key(p)]))
    graphdef, params = nnx.split(model)
    return DigitsClassifier(graphdef, params, path, sha256_of(path), meta)


def _read_meta(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["meta"]))
    except Exception:  # missing, partial or foreign: treated as absent, and replaced
        return None


def load_or_train(cache_dir: str | Path, seed: int = 0) -> DigitsClassifier:
    """The classifier for this cache: the saved one when its meta matches (architecture version, seed,
    manifest SHA-256), otherwise trained now (one printed line) and saved.

    Processes that train at the same time each write a complete file; the last rename wins.
    """
    path = classifier_path(cache_dir)
    wanted = {"version": ARCHITECTURE_VERSION, "seed": seed, "manifest_sha256": manifest_sha256(cache_dir)}
    meta = _read_meta(path)
    if meta is not None and all(meta.get(k) == v for k, v in wanted.items()):
        return load_classifier(path)
    params, report = train_classifier(cache_dir, seed=seed)
    print(f"training the digits feature classifier (once): {report['steps']} steps, held-out accuracy "
          f"{report['heldout_accuracy']:.3f}, {report['seconds']:.0f} s -> {path}", flush=True)
    save_classifier(path, params, {**wanted, **report, "cache": str(Path(cache_dir).resolve())})
    return load_classifier(path)


def digits_reference(cache_dir: str | Path, classifier: DigitsClassifier) -> Reference:
    """The reference statistics of `fd_digits`: every record's unflipped image, quantised to uint8 as
    the samples are, embedded by the classifier."""
    cache = LatentCache(cache_dir)
    images, _ = cache_images(cache)
    features = classifier.features(images[:, 0])
    mu, sigma = statistics(features)
    cache_sha = manifest_sha256(cache_dir)
    digest = hashlib.sha256(f"{classifier.sha256}:{cache_sha}".encode()).hexdigest()
    meta = {"metric": METRIC_NAME, "classifier": str(classifier.path), "classifier_sha256": classifier.sha256,
            "cache": str(Path(cache_dir).resolve()), "manifest_sha256": cache_sha, "images": "unflipped"}
    return Reference(mu, sigma, len(features), features, f"{METRIC_NAME}: {classifier.path} on {cache_dir}",
                     digest, meta)
