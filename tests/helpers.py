"""Small shared helpers for the tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit.config import ModelConfig
from dit.model import DiT

TINY = ModelConfig(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def randomized(cfg: ModelConfig, seed: int = 0, scale: float = 0.05) -> DiT:
    """A model whose every parameter, zero-initialised ones included, is random and non-zero."""
    model = DiT(cfg, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def batch(cfg: ModelConfig, n: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, cfg.input_size, cfg.input_size, cfg.in_channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, n))
    y = jnp.asarray(rng.integers(0, cfg.num_classes, n))
    return x, t, y


def random_inception_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in pytorch-fid's layout: He-normal convolutions, unit BatchNorm statistics."""
    from dit.eval.inception import torch_key_shapes
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in torch_key_shapes().items():
        if key.endswith("running_var") or (key.endswith("bn.weight")):
            sd[key] = np.ones(shape, np.float32)
        elif key.endswith("running_mean") or key.endswith("bias"):
            sd[key] = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            sd[key] = (rng.normal(size=shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    return sd


def write_random_inception(path, seed: int = 0):
    """A random FID Inception saved as the project's converted copy (.safetensors); returns the path."""
    from safetensors.numpy import save_file
    save_file(random_inception_state_dict(seed), str(path))
    return path
