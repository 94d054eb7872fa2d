"""Classifier-free guidance as a wrapper around any model function, for every objective and sampler."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[..., jax.Array]  # model_fn(x, t, y) -> (B, H, W, C_out)


def guided_model_fn(model_fn: ModelFn, scale: float, null_label: int, guided_channels: int | None = 3,
                    interval: tuple[float, float] | None = None) -> ModelFn:
    """A model function that returns uncond + scale * (cond - uncond) on the guided channels.

    One forward on the doubled batch [cond; null labels]. Guidance acts on the first `guided_channels`
    output channels: 3 as DiT, the latent channel count for the whole prediction (as SiT and most
    later work), None for every output channel; the others (learned sigma) come from the conditional
    output. Guidance acts
    only where interval[0] <= t <= interval[1] (in the model's time units), elsewhere the output is
    the conditional one. With scale 1 the result is the conditional output, from one forward when the
    scale is a number; a traced scale (one compiled sampler for every scale of a sweep) always runs two.
    """
    if isinstance(scale, (int, float)) and scale == 1.0:
        return model_fn

    def fn(x, t, y):
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([y, jnp.full_like(y, null_label)]))
        cond, uncond = jnp.split(out, 2, axis=0)
        s = jnp.full(t.shape, scale, jnp.float32)
        if interval is not None:
            s = jnp.where((t >= interval[0]) & (t <= interval[1]), s, 1.0)
        return guide(cond, uncond, s.reshape((-1,) + (1,) * (cond.ndim - 1)), guided_channels)

    return fn


def guide(cond: jax.Array, uncond: jax.Array, scale, guided_channels: int | None = 3) -> jax.Array:
    """uncond + scale * (cond - uncond) on the first `guided_channels` channels (every channel: None); the
    others from cond. The one guidance formula: the samplers (above) and DiT's forward_with_cfg use it."""
    n = cond.shape[-1] if guided_channels is None else guided_channels
    guided = uncond[..., :n] + scale * (cond[..., :n] - uncond[..., :n])
    return jnp.concatenate([guided, cond[..., n:]], axis=-1)
