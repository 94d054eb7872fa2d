"""DiT's Gaussian diffusion in JAX: the DDPM training loss and the DDPM and DDIM samplers.

As the official DiT (which keeps ADM's diffusion): a 1000-step linear beta schedule, epsilon prediction,
a learned log variance interpolated between the clipped posterior variance and beta_t, and the hybrid
loss mse + vb, where the variational bound trains the variance only. The schedule tables are float64
NumPy, read as float32 at run time as ADM does. Arrays are NHWC. `t` indexes this (possibly respaced)
diffusion; the model is always called with the original timesteps.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[..., jax.Array]  # model_fn(x_t, t, **model_kwargs) -> (B, H, W, C), or 2C with learn_sigma


def linear_beta_schedule(num_steps: int) -> np.ndarray:
    """Ho et al.'s linear betas, scaled as ADM so that any step count covers the same noise levels."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_steps: int, section_counts: str | Sequence[int]) -> list[int]:
    """ADM's respacing: the sorted timesteps of a `num_steps` process that a shorter process keeps.

    "ddimN" keeps every k-th step for the integer stride k that gives exactly N steps. Otherwise the
    process is cut into len(section_counts) near-equal sections, each strided evenly (both ends kept)
    down to its count; "250" is one section of 250 steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            count = int(section_counts[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == count:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"no integer stride takes exactly {count} of {num_steps} steps")
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per_section, extra = divmod(num_steps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per_section + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float stride and round half to even, exactly as ADM, so the kept steps agree.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class Prediction(NamedTuple):
    """The model's reverse step p(x_{t-1} | x_t) and its estimate of x0."""

    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array


def _at(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] in float32, shaped (B, 1, ..., 1) to broadcast against an ndim-dimensional batch."""
    values = jnp.asarray(table, jnp.float32)[t]
    return values.reshape(values.shape + (1,) * (ndim - 1))


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-log_var2))


def _approx_standard_normal_cdf(x):
    # ADM's tanh approximation of the normal CDF, kept so that the decoder NLL matches it exactly.
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element for data in [-1, 1] quantised to 256 levels (bins 2/255 wide), in nats.

    The two end bins reach out to -inf and +inf.
    """
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """A DDPM over `betas` with an epsilon-predicting model; step i is original timestep timestep_map[i]."""

    def __init__(self, betas: np.ndarray, *, learn_sigma: bool = True, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1]")
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        if self.timestep_map.shape != betas.shape:
            raise ValueError("timestep_map needs one original timestep per step")

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.betas = betas
        self.log_betas = np.log(betas)
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1.0)

        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log takes the t = 1 value there instead.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                               self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
        # Without learn_sigma the variance is beta_t, except at t = 0 where beta_0 would make the
        # decoder likelihood needlessly sharp (ADM's "fixed large").
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t ~ q(x_t | x0) for the given standard normal noise."""
        return (_at(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _at(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior_mean_variance(self, x0: jax.Array, x_t: jax.Array,
                                  t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Mean, variance and clipped log variance of the posterior q(x_{t-1} | x_t, x0)."""
        mean = _at(self.posterior_mean_coef1, t, x_t.ndim) * x0 + _at(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        variance = jnp.broadcast_to(_at(self.posterior_variance, t, x_t.ndim), x_t.shape)
        log_variance = jnp.broadcast_to(_at(self.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape)
        return mean, variance, log_variance

    def p_mean_variance(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, clip_denoised: bool = False,
                        **model_kwargs) -> Prediction:
        """The model's p(x_{t-1} | x_t); clip_denoised clips its x0 estimate to [-1, 1]."""
        return self._prediction(self._call_model(model_fn, x, t, model_kwargs), x, t, clip_denoised)

    def training_losses(self, model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array,
                        **model_kwargs) -> dict[str, jax.Array]:
        """Per-example `loss` = `mse` (of epsilon) + `vb` (the bound's term at t, in bits per dim)."""
        x_t = self.q_sample(x0, t, noise)
        output = self._call_model(model_fn, x_t, t, model_kwargs)
        channels = x0.shape[-1]
        eps = output[..., :channels]
        mse = _mean_flat((noise - eps) ** 2)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse, "vb": jnp.zeros_like(mse)}
        # The bound trains only the variance; the mean is left to the mse.
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), output[..., channels:]], axis=-1)
        vb = self._vb_bits_per_dim(frozen, x0, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def p_sample_loop(self, model_fn: ModelFn, shape: tuple[int, ...], key: jax.Array,
                      clip_denoised: bool = False, model_kwargs: dict | None = None,
                      noise: jax.Array | None = None) -> jax.Array:
        """DDPM ancestral sampling through every step of this diffusion, from `noise` or from `key`."""
        model_kwargs = model_kwargs or {}

        def step(x, t, step_key):
            pred = self.p_mean_variance(model_fn, x, t, clip_denoised, **model_kwargs)
            z = jax.random.normal(step_key, x.shape, x.dtype)
            return pred.mean + self._unless_last(t, x.ndim) * jnp.exp(0.5 * pred.log_variance) * z

        return self._reverse_loop(step, shape, key, noise)

    def ddim_sample_loop(self, model_fn: ModelFn, shape: tuple[int, ...], key: jax.Array, eta: float = 0.0,
                         clip_denoised: bool = False, model_kwargs: dict | None = None,
                         noise: jax.Array | None = None) -> jax.Array:
        """DDIM sampling through every step of this diffusion; eta = 0 is deterministic given `noise`."""
        model_kwargs = model_kwargs or {}

        def step(x, t, step_key):
            pred = self.p_mean_variance(model_fn, x, t, clip_denoised, **model_kwargs)
            # Epsilon consistent with the (possibly clipped) x0 estimate, as ADM.
            eps = ((_at(self.sqrt_recip_alphas_cumprod, t, x.ndim) * x - pred.pred_x0)
                   / _at(self.sqrt_recipm1_alphas_cumprod, t, x.ndim))
            alpha_bar = _at(self.alphas_cumprod, t, x.ndim)
            alpha_bar_prev = _at(self.alphas_cumprod_prev, t, x.ndim)
            sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                     * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
            mean = pred.pred_x0 * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
            z = jax.random.normal(step_key, x.shape, x.dtype)
            return mean + self._unless_last(t, x.ndim) * sigma * z

        return self._reverse_loop(step, shape, key, noise)

    def _call_model(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, model_kwargs: dict) -> jax.Array:
        original_t = jnp.asarray(self.timestep_map)[t].astype(t.dtype)
        return model_fn(x, original_t, **model_kwargs)

    def _prediction(self, output: jax.Array, x: jax.Array, t: jax.Array, clip_denoised: bool) -> Prediction:
        channels = x.shape[-1]
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape != x.shape[:-1] + (expected,):
            raise ValueError(f"model output {output.shape} for input {x.shape}: expected {expected} channels")
        eps = output[..., :channels]
        if self.learn_sigma:
            # v in [-1, 1] spans the log variance from the posterior's (v = -1) to beta_t's (v = 1).
            frac = (output[..., channels:] + 1) / 2
            log_variance = (frac * _at(self.log_betas, t, x.ndim)
                            + (1 - frac) * _at(self.posterior_log_variance_clipped, t, x.ndim))
            variance = jnp.exp(log_variance)
        else:
            variance = jnp.broadcast_to(_at(self.fixed_large_variance, t, x.ndim), x.shape)
            log_variance = jnp.broadcast_to(_at(self.fixed_large_log_variance, t, x.ndim), x.shape)
        pred_x0 = (_at(self.sqrt_recip_alphas_cumprod, t, x.ndim) * x
                   - _at(self.sqrt_recipm1_alphas_cumprod, t, x.ndim) * eps)
        if clip_denoised:
            pred_x0 = jnp.clip(pred_x0, -1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x, t)
        return Prediction(mean, variance, log_variance, pred_x0)

    def _vb_bits_per_dim(self, output: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """The bound's term at t: the decoder NLL -log p(x0 | x1) at t = 0, else the KL to the posterior."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        pred = self._prediction(output, x_t, t, clip_denoised=False)
        kl = _mean_flat(_normal_kl(true_mean, true_log_variance, pred.mean, pred.log_variance))
        decoder_nll = -_mean_flat(_discretized_gaussian_log_likelihood(x0, pred.mean, 0.5 * pred.log_variance))
        return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)

    @staticmethod
    def _unless_last(t: jax.Array, ndim: int) -> jax.Array:
        # No noise is added on the step to x0.
        return (t != 0).astype(jnp.float32).reshape(t.shape + (1,) * (ndim - 1))

    def _reverse_loop(self, step, shape: tuple[int, ...], key: jax.Array, noise: jax.Array | None) -> jax.Array:
        """Runs x <- step(x, t, key_t) for t = T-1 .. 0 in one lax.scan, from noise or a draw from key."""
        key_start, key_steps = jax.random.split(key)
        x = jax.random.normal(key_start, shape) if noise is None else noise

        def body(x, inputs):
            i, step_key = inputs
            return step(x, jnp.full((x.shape[0],), i, jnp.int32), step_key), None

        steps = jnp.arange(self.num_timesteps - 1, -1, -1)
        x, _ = jax.lax.scan(body, x, (steps, jax.random.split(key_steps, self.num_timesteps)))
        return x


def create_diffusion(timestep_respacing: str | Sequence[int] | None = "", noise_schedule: str = "linear",
                     learn_sigma: bool = True, diffusion_steps: int = 1000) -> GaussianDiffusion:
    """DiT's diffusion, optionally respaced ("250", "10,15,20" sections, or "ddim50"; "" keeps every step).

    As DiT's defaults, the vb term is not rescaled (ADM's LossType.MSE); without learn_sigma the
    variance is fixed large and the loss is the mse alone.
    """
    if noise_schedule != "linear":
        raise ValueError(f"unknown noise schedule {noise_schedule!r}; only 'linear' (DiT's) is implemented")
    betas = linear_beta_schedule(diffusion_steps)
    kept = space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps])
    alphas_cumprod = np.cumprod(1.0 - betas)[kept]
    # The respaced process jumps between kept steps, so its betas follow from their alphas_cumprod.
    spaced_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return GaussianDiffusion(spaced_betas, learn_sigma=learn_sigma, timestep_map=kept)
