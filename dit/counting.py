"""Parameter and FLOP counts of a model config, from abstract shapes only (no parameter memory)."""

from __future__ import annotations

import functools
import math

import jax
import jax.extend  # jaxpr types, for walking nested jaxprs
import jax.numpy as jnp
from flax import nnx

from dit.config import ModelConfig
from dit.model import DiT


@functools.lru_cache(maxsize=64)
def abstract_model(cfg: ModelConfig) -> DiT:
    """The model with ShapeDtypeStructs in place of arrays (jax.eval_shape through nnx); read-only, cached."""
    return nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> int:
    """Trainable parameters (nnx.Param); the fixed sin-cos position embedding is not one."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def product_macs(jaxpr, platform: str | None = None) -> int:
    """Multiply-adds of every matrix product and convolution in a jaxpr, each loop iteration counted.

    Of a `lax.platform_dependent` choice only the branch lowered for `platform` counts (None: the
    default branch, what accelerators run)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond" and eqn.params.get("branches_platforms"):
            chosen = [i for i, names in enumerate(eqn.params["branches_platforms"])
                      if names is None and platform is None or names is not None and platform in names]
            fallback = [i for i, names in enumerate(eqn.params["branches_platforms"]) if names is None]
            total += product_macs(eqn.params["branches"][(chosen or fallback)[0]].jaxpr, platform)
            continue
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            out_features = out[eqn.params["dimension_numbers"].out_spec[1]]
            total += math.prod(out) * math.prod(rhs) // out_features
        # Nested jaxprs (jit, custom_jvp, ...); a scan body runs `length` times.
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += repeat * product_macs(sub.jaxpr, platform)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += repeat * product_macs(sub, platform)
    return total


def count_gflops(cfg: ModelConfig) -> float:
    """GFLOPs as the DiT paper counts them: multiply-accumulates of one forward of one image, / 1e9.

    Counts every matrix product and convolution (attention's included) in the traced forward; norms
    and elementwise work are left out, as in the paper's table (DiT-S/2: 6.06).
    """
    graphdef, state = nnx.split(abstract_model(cfg))
    x = jax.ShapeDtypeStruct((1, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    forward = lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y)
    return product_macs(jax.make_jaxpr(forward)(state, x, t, y).jaxpr) / 1e9
