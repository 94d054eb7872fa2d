"""The training objective of a run as one function: (model_fn, x0, y, key) -> (per-example loss, noise level).

The noise level is the example's time as a fraction in [0, 1], 0 the cleanest and 1 pure noise, for
both objectives, so the per-quartile losses in metrics.jsonl mean the same thing for each.

The objective is a training setting (`train.objective`), independent of the variant; the diffusion
and flow modules never import the model.
"""

from __future__ import annotations

import jax

from dit.config import RunConfig
from dit.diffusion import create_diffusion
from dit.flow import create_flow


def make_objective(run: RunConfig):
    """DDPM as DiT (hybrid MSE + VLB loss on learned sigma) or flow matching as SiT."""
    if run.train.objective == "ddpm":
        diffusion = create_diffusion(learn_sigma=run.model.learn_sigma)

        def ddpm(model_fn, x0, y, key):
            key_t, key_noise = jax.random.split(key)
            t = jax.random.randint(key_t, (x0.shape[0],), 0, diffusion.num_timesteps)
            noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
            terms = diffusion.training_losses(model_fn, x0, t, noise, y=y)
            return terms["loss"], t / diffusion.num_timesteps

        return ddpm
    flow = create_flow(time_sampling=run.train.time_sampling)

    def flow_matching(model_fn, x0, y, key):
        key_t, key_noise = jax.random.split(key)
        t = flow.sample_t(key_t, x0.shape[0])
        noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
        return flow.training_losses(model_fn, x0, t, noise, y=y)["loss"], 1.0 - t  # SiT: t=0 is noise

    return flow_matching
