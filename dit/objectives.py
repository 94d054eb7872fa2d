"""The training objective of a run: the draws of time and noise for a batch, and the per-example loss.

The noise level is the example's time as a fraction in [0, 1], 0 the cleanest and 1 pure noise, for
both objectives, so the per-quartile losses in metrics.jsonl mean the same thing for each.

The objective is a training setting (`train.objective`), independent of the variant; the diffusion
and flow modules never import the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax

from dit.config import RunConfig
from dit.diffusion import create_diffusion
from dit.flow import create_flow


@dataclass(frozen=True)
class Objective:
    """`draw(key, x0) -> noise` draws each example's time and noise for a whole batch; `loss(model_fn, x0,
    y, noise) -> (per-example loss, noise level)` scores any slice of it. Apart, so that the k
    microbatches of an accumulated step see exactly the draws of the one full batch."""

    draw: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    loss: Callable[..., tuple[jax.Array, jax.Array]]


def make_objective(run: RunConfig) -> Objective:
    """DDPM as DiT (hybrid MSE + VLB loss on learned sigma) or flow matching as SiT."""
    if run.train.objective == "ddpm":
        diffusion = create_diffusion(learn_sigma=run.model.learn_sigma)

        def draw_ddpm(key, x0):
            key_t, key_noise = jax.random.split(key)
            t = jax.random.randint(key_t, (x0.shape[0],), 0, diffusion.num_timesteps)
            return t, jax.random.normal(key_noise, x0.shape, x0.dtype)

        def ddpm(model_fn, x0, y, noise):
            t, noise = noise
            terms = diffusion.training_losses(model_fn, x0, t, noise, y=y)
            return terms["loss"], t / diffusion.num_timesteps

        return Objective(draw_ddpm, ddpm)
    flow = create_flow(time_sampling=run.train.time_sampling)

    def draw_flow(key, x0):
        key_t, key_noise = jax.random.split(key)
        return flow.sample_t(key_t, x0.shape[0]), jax.random.normal(key_noise, x0.shape, x0.dtype)

    def flow_matching(model_fn, x0, y, noise):
        t, noise = noise
        return flow.training_losses(model_fn, x0, t, noise, y=y)["loss"], 1.0 - t  # SiT: t=0 is noise

    return Objective(draw_flow, flow_matching)
