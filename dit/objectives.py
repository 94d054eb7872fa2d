"""The training objectives, one object each: its draws of time and noise, its per-example loss, its
samplers and its time convention (as SiT's `transport/`), so a new loss term or sampler is one place.

The noise level is the example's time as a fraction in [0, 1], 0 the cleanest and 1 pure noise, for
both objectives, so the per-quartile losses in metrics.jsonl and the guidance interval (eval.guidance_*)
mean the same thing for each; `model_time` turns a level into the time the model is called with.

The objective is a training setting (`train.objective`), independent of the variant; the objectives,
like the diffusion and flow modules under them, never import the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import jax

from dit.config import SAMPLERS, EvalConfig, RunConfig
from dit.diffusion import create_diffusion
from dit.flow import create_flow

# loop(model_fn, noise, key) -> samples, where model_fn(x, t) is the (guided) model at the model's time t.
SamplingLoop = Callable[[Callable, jax.Array, jax.Array], jax.Array]


class Objective(Protocol):
    """`draw(key, x0) -> noise` draws each example's time and noise for a whole batch; `loss(model_fn, x0,
    y, noise) -> (per-example loss, noise level)` scores any slice of it. Apart, so that the k
    microbatches of an accumulated step see exactly the draws of the one full batch."""

    samplers: ClassVar[tuple[str, ...]]  # eval.sampler's choices, the default ("") first

    def draw(self, key: jax.Array, x0: jax.Array): ...
    def loss(self, model_fn: Callable, x0: jax.Array, y: jax.Array, noise) -> tuple[jax.Array, jax.Array]: ...
    def sampling(self, eval_cfg: EvalConfig) -> tuple[SamplingLoop, Callable[[float], float]]:
        """The sampling loop that eval_cfg names, and level -> model time for its guidance interval."""


@dataclass(frozen=True)
class DDPM:
    """DiT's diffusion: 1000 integer timesteps, epsilon prediction, the hybrid MSE + VLB loss on learned sigma."""

    learn_sigma: bool = True
    samplers: ClassVar = SAMPLERS["ddpm"]

    @functools.cached_property
    def diffusion(self):
        return create_diffusion(learn_sigma=self.learn_sigma)

    def draw(self, key, x0):
        key_t, key_noise = jax.random.split(key)
        t = jax.random.randint(key_t, (x0.shape[0],), 0, self.diffusion.num_timesteps)
        return t, jax.random.normal(key_noise, x0.shape, x0.dtype)

    def loss(self, model_fn, x0, y, noise):
        t, noise = noise
        terms = self.diffusion.training_losses(model_fn, x0, t, noise, y=y)
        return terms["loss"], t / self.diffusion.num_timesteps

    def sampling(self, eval_cfg):
        diffusion = create_diffusion(str(eval_cfg.sampling_steps), learn_sigma=self.learn_sigma)
        if (eval_cfg.sampler or self.samplers[0]) == "ddpm":
            loop = lambda fn, noise, key: diffusion.p_sample_loop(fn, noise.shape, key, noise=noise)
        else:
            loop = lambda fn, noise, key: diffusion.ddim_sample_loop(fn, noise.shape, key, eta=eval_cfg.ddim_eta,
                                                                     noise=noise)
        return loop, lambda level: level * diffusion.timestep_map.max()


@dataclass(frozen=True)
class Flow:
    """SiT's flow matching: t in [0, 1] from noise (0) to data (1), velocity prediction, the velocity MSE
    plus, with cosine_weight > 0, LightningDiT's velocity-direction term."""

    time_sampling: str = "uniform"
    cosine_weight: float = 0.0
    samplers: ClassVar = SAMPLERS["flow"]

    @functools.cached_property
    def flow(self):
        return create_flow(time_sampling=self.time_sampling, cosine_weight=self.cosine_weight)

    def draw(self, key, x0):
        key_t, key_noise = jax.random.split(key)
        return self.flow.sample_t(key_t, x0.shape[0]), jax.random.normal(key_noise, x0.shape, x0.dtype)

    def loss(self, model_fn, x0, y, noise):
        t, noise = noise
        return self.flow.training_losses(model_fn, x0, t, noise, y=y)["loss"], 1.0 - t

    def sampling(self, eval_cfg):
        flow, steps, name = self.flow, eval_cfg.sampling_steps, eval_cfg.sampler or self.samplers[0]
        if name == "sde":
            loop = lambda fn, noise, key: flow.sample_sde(fn, noise.shape, key, steps=steps, noise=noise)
        else:
            loop = lambda fn, noise, key: flow.sample_ode(fn, noise.shape, key, steps=steps, method=name,
                                                          noise=noise, shift=eval_cfg.timestep_shift)
        return loop, lambda level: 1.0 - level


def make_objective(run: RunConfig) -> Objective:
    """The run's objective: DDPM as DiT or flow matching as SiT (with LightningDiT's additions as settings)."""
    if run.train.objective == "ddpm":
        return DDPM(learn_sigma=run.model.learn_sigma)
    return Flow(time_sampling=run.train.time_sampling, cosine_weight=run.train.cosine_loss)
