"""An independent float64 NumPy version of the official DiT (ADM) Gaussian diffusion math, used as the
parity reference for `dit.diffusion`: the schedule, respacing, the posterior, the model's reverse
step (DDPM and DDIM) and the training losses (mse + vb with the learned-range variance).

Written from the equations; it works in NCHW like the official code and shares no code with `dit/`.
"""

from __future__ import annotations

import numpy as np


def linear_betas(num_steps: int) -> np.ndarray:
    """beta_t linear from 1e-4 to 0.02 for 1000 steps, both ends scaled by 1000 / num_steps."""
    return np.linspace(1e-4, 0.02, num_steps) * (1000 / num_steps)


def space_timesteps(num_steps: int, spec: str) -> list[int]:
    """The kept timesteps: "ddimN" is the integer stride giving N steps; "a,b,c" strides equal sections."""
    if spec.startswith("ddim"):
        count = int(spec[4:])
        stride = next(k for k in range(1, num_steps) if -(-num_steps // k) == count)
        return list(range(0, num_steps, stride))
    counts = [int(c) for c in spec.split(",")]
    sizes = [num_steps // len(counts) + (i < num_steps % len(counts)) for i in range(len(counts))]
    starts = np.cumsum([0] + sizes[:-1])
    kept = []
    for start, size, count in zip(starts, sizes, counts):
        stride = (size - 1) / (count - 1) if count > 1 else 1
        # The official code adds the float stride up and rounds half to even; i * stride would round
        # ties differently (300 steps as "10,15,20" keeps 149 there, not 150).
        positions = np.cumsum([0.0] + [stride] * (count - 1))
        kept += [int(start + round(p)) for p in positions]
    return sorted(set(kept))


def spaced_betas(betas: np.ndarray, kept: list[int]) -> np.ndarray:
    """Betas of the process that jumps between the kept steps: 1 - abar_k / abar_{previous kept}."""
    abar = np.cumprod(1 - betas)[kept]
    return 1 - abar / np.concatenate([[1.0], abar[:-1]])


def _col(values: np.ndarray) -> np.ndarray:
    return values[:, None, None, None]


def posterior(betas: np.ndarray, x0: np.ndarray, xt: np.ndarray, t: np.ndarray):
    """q(x_{t-1} | x_t, x0): mean, variance, and log variance with t = 0 taking the t = 1 value."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    var = betas * (1 - abar_prev) / (1 - abar)
    log_var_clipped = np.log(np.concatenate([[var[1]], var[1:]]))
    mean = (_col(betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])) * x0
            + _col((1 - abar_prev[t]) * np.sqrt(1 - betas[t]) / (1 - abar[t])) * xt)
    return mean, _col(var[t]) + 0 * xt, _col(log_var_clipped[t]) + 0 * xt


def model_step(betas: np.ndarray, output: np.ndarray, xt: np.ndarray, t: np.ndarray, learn_sigma: bool = True):
    """The model's p(x_{t-1} | x_t) from its NCHW output: mean, log variance, predicted x0."""
    channels = xt.shape[1]
    eps = output[:, :channels]
    abar = np.cumprod(1 - betas)
    x0_pred = (xt - _col(np.sqrt(1 - abar[t])) * eps) / _col(np.sqrt(abar[t]))
    mean, _, log_post_var = posterior(betas, x0_pred, xt, t)
    if learn_sigma:
        frac = (output[:, channels:] + 1) / 2
        log_var = frac * _col(np.log(betas[t])) + (1 - frac) * log_post_var
    else:
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        large = np.concatenate([[betas[1] * (1 - abar_prev[1]) / (1 - abar[1])], betas[1:]])
        log_var = _col(np.log(large[t])) + 0 * xt
    return mean, log_var, x0_pred


def ddim_step(betas: np.ndarray, output: np.ndarray, xt: np.ndarray, t: np.ndarray, eta: float):
    """DDIM's x_{t-1} (Song et al., eq. 12) from the model's epsilon: its mean and standard deviation."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])[t]
    abar = abar[t]
    _, _, x0_pred = model_step(betas, output, xt, t)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    mean = _col(np.sqrt(abar_prev)) * x0_pred + _col(np.sqrt(1 - abar_prev - sigma**2)) * output[:, :xt.shape[1]]
    return mean, _col(sigma) + 0 * xt


def gaussian_kl(m1, log_v1, m2, log_v2):
    return 0.5 * (log_v2 - log_v1 + (np.exp(log_v1) + (m1 - m2) ** 2) / np.exp(log_v2) - 1)


def adm_normal_cdf(x):
    """ADM's tanh approximation of the standard normal CDF (the official decoder likelihood uses it)."""
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def discretized_log_likelihood(x, mean, log_std):
    """log of the Gaussian mass of x's bin (width 2/255, the end bins open) for data in [-1, 1]."""
    upper = adm_normal_cdf((x + 1 / 255 - mean) / np.exp(log_std))
    lower = adm_normal_cdf((x - 1 / 255 - mean) / np.exp(log_std))
    mass = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
    return np.log(np.maximum(mass, 1e-12))


def training_losses(betas: np.ndarray, output: np.ndarray, x0: np.ndarray, t: np.ndarray, noise: np.ndarray,
                    learn_sigma: bool = True) -> dict[str, np.ndarray]:
    """DiT's loss for a fixed model output (NCHW): mse of epsilon + the bound's term in bits per dim."""
    abar = np.cumprod(1 - betas)
    xt = _col(np.sqrt(abar[t])) * x0 + _col(np.sqrt(1 - abar[t])) * noise
    channels = x0.shape[1]
    mse = ((noise - output[:, :channels]) ** 2).mean(axis=(1, 2, 3))
    if not learn_sigma:
        return {"loss": mse, "mse": mse, "vb": np.zeros_like(mse)}
    true_mean, _, true_log_var = posterior(betas, x0, xt, t)
    mean, log_var, _ = model_step(betas, output, xt, t)
    kl = gaussian_kl(true_mean, true_log_var, mean, log_var).mean(axis=(1, 2, 3))
    nll = -discretized_log_likelihood(x0, mean, 0.5 * log_var).mean(axis=(1, 2, 3))
    vb = np.where(t == 0, nll, kl) / np.log(2)
    return {"loss": mse + vb, "mse": mse, "vb": vb}
