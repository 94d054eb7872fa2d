"""SiT's flow matching in JAX: the linear interpolant, the velocity loss, ODE (Euler, Heun) and SDE samplers.

Conventions follow SiT (Ma et al. 2024) with its defaults (linear path, velocity prediction): time runs
from t = 0 (noise) to t = 1 (data), x_t = t * x1 + (1 - t) * x0 with x0 standard normal noise and x1
data, and the model learns the velocity x1 - x0. The model is called with t in [0, 1] of shape (B,).
Arrays are NHWC; the velocity is the first C output channels (C = channels of x), so a model that also
outputs a learned sigma (2C channels) is used as SiT uses it: the extra channels are ignored.
The samplers take any model function and never import a model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[..., jax.Array]  # model_fn(x_t, t, **model_kwargs) -> (B, H, W, C), or 2C with learn_sigma

TIME_SAMPLINGS = ("uniform", "logit_normal")
ODE_METHODS = ("euler", "heun")


def interpolate(x1: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = t * x1 + (1 - t) * noise: the noise at t = 0, the data x1 at t = 1 (SiT's ICPlan)."""
    t = jnp.reshape(t, t.shape + (1,) * (x1.ndim - 1))
    return t * x1 + (1 - t) * noise


def velocity_target(x1: jax.Array, noise: jax.Array) -> jax.Array:
    """d x_t / dt = x1 - noise, the regression target of the velocity model."""
    return x1 - noise


def _velocity(model_fn: ModelFn, x: jax.Array, t: jax.Array, model_kwargs: dict) -> jax.Array:
    """The model's velocity at (x, t): the first C channels of its output."""
    output = model_fn(x, t, **model_kwargs)
    channels = x.shape[-1]
    if output.shape[:-1] != x.shape[:-1] or output.shape[-1] < channels:
        raise ValueError(f"model output {output.shape} for input {x.shape}: expected at least {channels} channels")
    return output[..., :channels]


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Cosine of the angle between a and b along the last (channel) axis, as torch computes it: the product of
    the squared norms clamped at eps^2, so a zero vector (a zero-initialised model's first output) gets a
    finite gradient (b / eps) rather than the NaN of differentiating a norm at zero."""
    squared = jnp.sum(jnp.square(a), axis=-1) * jnp.sum(jnp.square(b), axis=-1)
    return jnp.sum(a * b, axis=-1) * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def shifted_times(t: jax.Array, shift: float) -> jax.Array:
    """LightningDiT's sampling-time shift t -> shift * t / (1 + (shift - 1) * t); 0 (its "off") or 1 keep t.

    A shift below 1 spends more of the steps near the noise end t = 0 (LightningDiT samples with 0.3).
    """
    if shift == 0.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@dataclasses.dataclass(frozen=True)
class FlowMatching:
    """SiT's linear interpolant with velocity prediction; `time_sampling` picks the training times.

    "uniform": t ~ U[0, 1), as SiT, whose train_eps is 0 for the linear path with velocity prediction.
    "logit_normal": t = sigmoid(n), n ~ N(logit_mean, logit_std^2), as SD3 and LightningDiT.
    """

    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cosine_weight: float = 0.0  # LightningDiT's velocity-direction term, 1 - cos(v_pred, v) per pixel (it uses 1)

    def __post_init__(self):
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {self.time_sampling!r}; choose one of {TIME_SAMPLINGS}")
        if self.logit_std <= 0:
            raise ValueError("logit_std must be positive")
        if self.cosine_weight < 0:
            raise ValueError("cosine_weight must be non-negative")

    def sample_t(self, key: jax.Array, batch: int) -> jax.Array:
        """Training times, shape (batch,), float32 in [0, 1]."""
        if self.time_sampling == "uniform":
            return jax.random.uniform(key, (batch,), jnp.float32)
        n = self.logit_mean + self.logit_std * jax.random.normal(key, (batch,), jnp.float32)
        return jax.nn.sigmoid(n)

    def training_losses(self, model_fn: ModelFn, x1: jax.Array, t: jax.Array, noise: jax.Array,
                        **model_kwargs) -> dict[str, jax.Array]:
        """Per-example terms (B,): `mse`, the mean over non-batch dims of (v_pred - (x1 - noise))^2, unweighted
        as SiT; `cosine`, the mean over pixels of 1 - cos(v_pred, x1 - noise) over channels (LightningDiT's
        velocity-direction loss); `loss` = mse + cosine_weight * cosine.

        x1 is the data, t (B,) in [0, 1] and noise standard normal, both drawn by the caller.
        """
        x_t = interpolate(x1, noise, t)
        v_pred = _velocity(model_fn, x_t, t, model_kwargs).astype(jnp.float32)
        target = velocity_target(x1, noise).astype(jnp.float32)
        pixels = tuple(range(1, x1.ndim - 1))
        mse = jnp.mean(jnp.square(v_pred - target), axis=pixels + (x1.ndim - 1,))
        terms = {"mse": mse, "loss": mse}
        if self.cosine_weight:
            terms["cosine"] = jnp.mean(1.0 - cosine_similarity(v_pred, target), axis=pixels)
            terms["loss"] = mse + self.cosine_weight * terms["cosine"]
        return terms

    def sample_ode(self, model_fn: ModelFn, shape: tuple[int, ...], key: jax.Array | None, steps: int = 50,
                   method: str = "euler", model_kwargs: dict | None = None,
                   noise: jax.Array | None = None, shift: float = 0.0) -> jax.Array:
        """Integrates dx/dt = v(x, t) from t = 0 (`noise`, else a draw from `key`) to t = 1; deterministic.

        `steps` solver steps on the uniform grid t_i = i / steps, or with `shift` > 0 on LightningDiT's
        shifted grid (`shifted_times`). 'heun' skips the corrector on the last step, as EDM and REPA's SiT
        sampler do, so the model is never called at the data end t = 1 (2 * steps - 1 calls). SiT's
        fixed-step ODE counts grid points: its num_steps = N takes N - 1 steps.
        """
        if method not in ODE_METHODS:
            raise ValueError(f"unknown ODE method {method!r}; choose one of {ODE_METHODS}")
        if steps < 1:
            raise ValueError("steps must be at least 1")
        model_kwargs = model_kwargs or {}
        x = jax.random.normal(key, shape, jnp.float32) if noise is None else noise.astype(jnp.float32)

        def velocity(x, t):
            return _velocity(model_fn, x, jnp.full((x.shape[0],), t, jnp.float32), model_kwargs)

        def euler_step(x, times):
            t, t_next = times
            return x + (t_next - t) * velocity(x, t), None

        def heun_step(x, times):
            t, t_next = times
            v = velocity(x, t)
            x_euler = x + (t_next - t) * v
            return x + 0.5 * (t_next - t) * (v + velocity(x_euler, t_next)), None

        grid = shifted_times(jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32), shift)
        if method == "euler":
            x, _ = jax.lax.scan(euler_step, x, (grid[:-1], grid[1:]))
            return x
        x, _ = jax.lax.scan(heun_step, x, (grid[:-2], grid[1:-1]))
        x, _ = euler_step(x, (grid[-2], grid[-1]))
        return x

    def sample_sde(self, model_fn: ModelFn, shape: tuple[int, ...], key: jax.Array, steps: int = 250,
                   diffusion_norm: float = 1.0, last_step_size: float = 0.04,
                   model_kwargs: dict | None = None, noise: jax.Array | None = None) -> jax.Array:
        """SiT's default SDE sampler: Euler-Maruyama on dx = [v + w_t * score] dt + sqrt(2 w_t) dW.

        As SiT's defaults (train_utils.parse_sde_args): diffusion form "sigma", w_t = diffusion_norm
        * (1 - t); last step "Mean"; sample_eps 0 (SiT's value for this path), so the grid starts at
        t = 0. The score comes from the velocity for the linear path, score = (t * v - x) / (1 - t).
        `steps` counts model calls as SiT's num_steps: steps - 1 noisy steps on
        linspace(0, 1 - last_step_size, steps), then one noise-free drift step of
        last_step_size to t = 1 (last_step_size = 0 skips it, as SiT's last_step=None). The start is
        `noise` if given, else a draw from `key`; the step noise always comes from `key`.
        """
        if steps < 2:
            raise ValueError("steps must be at least 2")
        if not 0 <= last_step_size < 1:
            raise ValueError("last_step_size must be in [0, 1)")
        if diffusion_norm < 0:
            raise ValueError("diffusion_norm must be non-negative")
        model_kwargs = model_kwargs or {}
        key_start, key_steps = jax.random.split(key)
        x = jax.random.normal(key_start, shape, jnp.float32) if noise is None else noise.astype(jnp.float32)
        t_end = 1.0 - last_step_size
        dt = t_end / (steps - 1)

        def drift_and_diffusion(x, t):
            v = _velocity(model_fn, x, jnp.full((x.shape[0],), t, jnp.float32), model_kwargs)
            score = (t * v - x) / (1 - t)
            diffusion = diffusion_norm * (1 - t)
            return v + diffusion * score, diffusion

        def step(x, inputs):
            t, step_key = inputs
            drift, diffusion = drift_and_diffusion(x, t)
            dw = jnp.sqrt(dt) * jax.random.normal(step_key, x.shape, x.dtype)
            return x + drift * dt + jnp.sqrt(2 * diffusion) * dw, None

        grid = jnp.linspace(0.0, t_end, steps, dtype=jnp.float32)
        x, _ = jax.lax.scan(step, x, (grid[:-1], jax.random.split(key_steps, steps - 1)))
        if last_step_size > 0:
            # "Mean": the drift alone over the last stretch to t = 1, where the score is singular.
            drift, _ = drift_and_diffusion(x, t_end)
            x = x + last_step_size * drift
        return x


def create_flow(time_sampling: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                cosine_weight: float = 0.0) -> FlowMatching:
    """SiT's flow matching (linear path, velocity prediction) with the given training-time sampling and
    velocity-direction loss weight."""
    return FlowMatching(time_sampling=time_sampling, logit_mean=logit_mean, logit_std=logit_std,
                        cosine_weight=cosine_weight)
