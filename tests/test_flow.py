"""Flow matching (dit/flow.py) against closed forms: the interpolant, the loss, time sampling, and samplers
driven by exact velocity fields of point-mass and Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.flow import create_flow, interpolate, shifted_times, velocity_target
from dit.guidance import guided_model_fn

SHAPE = (2, 4, 4, 3)


def _column(t):
    """t of shape (B,) as (B, 1, 1, 1); a scalar stays a scalar."""
    return t.reshape(-1, 1, 1, 1) if np.ndim(t) else t


def point_mass_velocity(target):
    """The exact velocity when all data equal `target`: E[x1 - x0 | x_t = x] = (target - x) / (1 - t)."""
    def model_fn(x, t):
        return (target - x) / (1 - _column(t))
    return model_fn


def gaussian_velocity(x, t, mean, std):
    """The exact velocity for data ~ N(mean, std^2 I): x_t ~ N(t mean, var_t), var_t = t^2 std^2 + (1 - t)^2,
    and E[x1 - x0 | x_t = x] = mean + (t std^2 - (1 - t)) / var_t * (x - t mean)."""
    var = t**2 * std**2 + (1 - t) ** 2
    return mean + (t * std**2 - (1 - t)) / var * (x - t * mean)


def gaussian_model(mean, std):
    """A model with the exact Gaussian velocity in its first C channels and garbage in C more (learned sigma)."""
    def model_fn(x, t):
        v = gaussian_velocity(x, _column(t), mean, std)
        return jnp.concatenate([v, 100.0 + x], axis=-1)
    return model_fn


def normal(seed, shape=SHAPE):
    # NumPy draws: each new shape of jax.random.normal costs a compile of seconds on the CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --- interpolant and loss ---

def test_interpolant_endpoints_and_velocity():
    x1, noise = normal(1), normal(2)
    np.testing.assert_array_equal(interpolate(x1, noise, jnp.zeros(2)), noise)
    np.testing.assert_array_equal(interpolate(x1, noise, jnp.ones(2)), x1)
    t = jnp.array([0.25, 0.7])
    expected = np.stack([0.25 * x1[0] + 0.75 * noise[0], 0.7 * x1[1] + 0.3 * noise[1]])
    np.testing.assert_allclose(interpolate(x1, noise, t), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(velocity_target(x1, noise), x1 - noise)
    # The target is the time derivative of the interpolant.
    _, d_dt = jax.jvp(lambda t: interpolate(x1, noise, t), (t,), (jnp.ones(2),))
    np.testing.assert_allclose(d_dt, x1 - noise, rtol=1e-6, atol=1e-6)


def test_training_losses_match_numpy():
    x1, noise = normal(1), normal(2)
    t = jnp.array([0.1, 0.8])
    y = jnp.array([3, 5])

    def model_fn(x, t, y):
        # Depends on x_t, t and y; C extra channels of garbage that the loss must ignore.
        v = 0.3 * x + _column(t) + 0.1 * _column(y)
        return jnp.concatenate([v, jnp.full_like(x, 1e3)], axis=-1)

    terms = create_flow().training_losses(model_fn, x1, t, noise, y=y)
    x1_np, noise_np, t_np = np.asarray(x1, np.float64), np.asarray(noise, np.float64), np.asarray(t, np.float64)
    x_t = t_np[:, None, None, None] * x1_np + (1 - t_np[:, None, None, None]) * noise_np
    v_pred = 0.3 * x_t + t_np[:, None, None, None] + 0.1 * np.array([3.0, 5.0])[:, None, None, None]
    expected = ((v_pred - (x1_np - noise_np)) ** 2).mean(axis=(1, 2, 3))
    assert terms["loss"].shape == (2,)
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-5)


def test_loss_is_zero_for_the_exact_velocity():
    target = normal(3, SHAPE[1:])
    x1 = jnp.broadcast_to(target, SHAPE)
    t = jnp.array([0.0, 0.9])
    flow = create_flow()
    exact = flow.training_losses(point_mass_velocity(target), x1, t, normal(4))["loss"]
    np.testing.assert_allclose(exact, 0.0, atol=1e-10)
    # The same field aimed at another point is penalised, so the zero above is not vacuous.
    wrong = flow.training_losses(point_mass_velocity(target + 0.5), x1, t, normal(4))["loss"]
    assert np.all(np.asarray(wrong) > 0.2)


def test_cosine_loss_matches_lightningdit_formula_in_torch():
    # LightningDiT (transport/transport.py): mean_flat(1 - cosine_similarity(model_output, ut, dim=1)) on NCHW,
    # added to the mean squared velocity error with weight 1.
    torch = pytest.importorskip("torch")
    x1, noise, t, y = normal(1), normal(2), jnp.array([0.1, 0.8]), jnp.array([3, 5])
    model_fn = lambda x, t, y: -0.7 * x + _column(t) + 0.1 * _column(y)
    x_t = interpolate(x1, noise, t)
    nchw = lambda a: torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)
    v_pred, target = nchw(model_fn(x_t, t, y)), nchw(velocity_target(x1, noise))
    cosine = (1 - torch.nn.functional.cosine_similarity(v_pred, target, dim=1)).mean(dim=(1, 2)).numpy()
    mse = ((v_pred - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    terms = create_flow(cosine_weight=0.5).training_losses(model_fn, x1, t, noise, y=y)
    np.testing.assert_allclose(terms["cosine"], cosine, rtol=1e-5)
    np.testing.assert_allclose(terms["mse"], mse, rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], mse + 0.5 * cosine, rtol=1e-5)
    assert "cosine" not in create_flow().training_losses(model_fn, x1, t, noise, y=y)
    # A zero-initialised model's first output is zero: the gradient is finite (torch's: target / eps), not NaN.
    zero = lambda x, t, y: 0.0 * x
    grad = jax.grad(lambda s: create_flow(cosine_weight=1.0).training_losses(
        lambda x, t, y: s * x, x1, t, noise, y=y)["loss"].sum())(0.0)
    assert np.isfinite(grad) and np.isfinite(create_flow(cosine_weight=1.0).training_losses(zero, x1, t, noise, y=y)["loss"]).all()


def test_timestep_shift_is_lightningdits_and_the_ode_steps_on_it():
    grid = np.linspace(0, 1, 9)
    # LightningDiT (transport/integrators.py, compute_tm): shift * t / (1 + (shift - 1) * t), off at 0.
    expected = [0.3 * t / (1 + (0.3 - 1) * t) for t in grid]
    np.testing.assert_allclose(shifted_times(jnp.asarray(grid, jnp.float32), 0.3), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(shifted_times(jnp.asarray(grid), 0.0), grid)
    # With v(x, t) = t, Euler adds sum_i t_i (t_{i+1} - t_i): it depends on the grid, so it shows the one used.
    shifted = np.array(expected)
    euler = np.sum(shifted[:-1] * np.diff(shifted))
    out = create_flow().sample_ode(lambda x, t: jnp.broadcast_to(_column(t), x.shape), SHAPE, None, 8, "euler",
                                   noise=jnp.zeros(SHAPE), shift=0.3)
    np.testing.assert_allclose(out, euler, rtol=1e-5)
    assert abs(euler - np.sum(grid[:-1] * np.diff(grid))) > 0.03  # 0.405 against 0.4375 unshifted


# --- time sampling ---

@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.5, 1.5)])
def test_logit_normal_times(mean, std):
    flow = create_flow("logit_normal", logit_mean=mean, logit_std=std)
    t = np.asarray(flow.sample_t(jax.random.key(0), 200_000), np.float64)
    assert t.shape == (200_000,) and np.all((t > 0) & (t < 1))
    logit = np.log(t) - np.log1p(-t)
    # Standard errors: std / sqrt(n) ~ 0.0034 for the mean and ~ 0.0024 for the std; 0.02 is > 5 of them.
    assert abs(logit.mean() - mean) < 0.02
    assert abs(logit.std() - std) < 0.02


def test_uniform_times():
    t = create_flow("uniform").sample_t(jax.random.key(0), 200_000)
    assert t.dtype == jnp.float32 and t.shape == (200_000,)
    t = np.asarray(t, np.float64)
    assert np.all((t >= 0) & (t < 1))
    # U[0, 1): mean 1/2, variance 1/12, a tenth below 0.1 (standard errors < 0.001).
    assert abs(t.mean() - 0.5) < 0.005
    assert abs(t.var() - 1 / 12) < 0.003
    assert abs((t < 0.1).mean() - 0.1) < 0.005


def test_unknown_time_sampling_is_rejected():
    with pytest.raises(ValueError, match="time sampling"):
        create_flow("lognormal")


# --- samplers on exact velocity fields ---

@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_reaches_a_point_mass(method):
    # Along the exact field the error shrinks by (1 - t_next) / (1 - t) per step for Euler and Heun
    # alike, so both land on the target up to rounding, whatever the step count.
    target = normal(3, SHAPE[1:])
    sample = jax.jit(lambda key: create_flow().sample_ode(point_mass_velocity(target), SHAPE, key, 7, method))
    out = sample(jax.random.key(0))
    np.testing.assert_allclose(out, jnp.broadcast_to(target, SHAPE), atol=1e-4)


def test_sde_reaches_a_point_mass():
    # With exact dynamics x_{0.96} ~ N(0.96 x*, 0.04^2), and the final "Mean" step maps it to x* - 0.04 eps:
    # the error has mean 0 (standard error ~0.001) and an RMS of about 0.04.
    target = 1.5 + normal(3, SHAPE[1:])
    shape = (64,) + SHAPE[1:]
    out = jax.jit(lambda key: create_flow().sample_sde(point_mass_velocity(target), shape, key))(jax.random.key(0))
    error = np.asarray(out - target)
    assert abs(error.mean()) < 0.01
    assert 0.03 < np.sqrt((error**2).mean()) < 0.055
    assert np.abs(error).max() < 0.3


def test_ode_maps_gaussian_noise_to_gaussian_data():
    # For data ~ N(m, s^2 I) the exact flow is x_t = t m + sqrt(var_t) z, so noise z ends at m + s z:
    # a per-sample check, stronger than matching the endpoint mean and std. Euler is first order
    # (doubling the steps halves the error), Heun second order (it quarters it).
    mean, std = 1.0, 0.5
    noise = normal(5, (16,) + SHAPE[1:])
    flow = create_flow()

    def max_error(method, steps):
        out = jax.jit(lambda z: flow.sample_ode(gaussian_model(mean, std), z.shape, None, steps, method,
                                                noise=z))(noise)
        return float(jnp.abs(out - (mean + std * noise)).max())

    euler_20, euler_40 = max_error("euler", 20), max_error("euler", 40)
    heun_20, heun_40 = max_error("heun", 20), max_error("heun", 40)
    assert euler_20 < 0.2 and 0.4 < euler_40 / euler_20 < 0.6
    assert heun_20 < 0.01 and 0.15 < heun_40 / heun_20 < 0.35


def test_sde_samples_gaussian_data():
    # The SDE keeps the marginals of the flow, so its samples follow N(m, s^2). 49152 values: standard
    # errors 0.0023 (mean) and 0.0016 (std). Dropping the final step shifts the mean by ~0.03; half the
    # noise variance shrinks the std to ~0.37; both fail here.
    mean, std = 1.0, 0.5
    shape = (1024,) + SHAPE[1:]
    out = jax.jit(lambda key: create_flow().sample_sde(gaussian_model(mean, std), shape, key))(jax.random.key(0))
    assert abs(float(out.mean()) - mean) < 0.015
    assert abs(float(out.std()) - std) < 0.02


@pytest.mark.parametrize("last_step_size", [0.04, 0.0])
def test_sde_without_diffusion_is_euler_on_sits_grid(last_step_size):
    # With diffusion_norm = 0 nothing is random: steps - 1 Euler steps on linspace(0, 1 - last_step_size,
    # steps) and, unless last_step_size is 0, one more step of last_step_size (SiT's "Mean" last step).
    mean, std, steps = 1.0, 0.5, 10
    noise = normal(5)
    out = create_flow().sample_sde(gaussian_model(mean, std), SHAPE, jax.random.key(0), steps,
                                   diffusion_norm=0.0, last_step_size=last_step_size, noise=noise)
    x = np.asarray(noise, np.float64)
    grid = np.linspace(0.0, 1.0 - last_step_size, steps)
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * gaussian_velocity(x, t, mean, std)
    if last_step_size:
        x = x + last_step_size * gaussian_velocity(x, grid[-1], mean, std)
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


def test_sde_is_deterministic_for_a_key():
    # The starting noise is fixed, so any difference comes from the key's step noise.
    model, flow = gaussian_model(1.0, 0.5), create_flow()
    sample = jax.jit(lambda key, noise: flow.sample_sde(model, SHAPE, key, 50, noise=noise))
    noise = normal(5)
    first, again = sample(jax.random.key(0), noise), sample(jax.random.key(0), noise)
    other = sample(jax.random.key(1), noise)
    np.testing.assert_array_equal(first, again)
    assert float(jnp.abs(first - other).max()) > 0.05


# --- classifier-free guidance through the samplers ---

CLASS_MEANS = jnp.array([-1.0, 0.5, 2.0])  # the last class is the null label
STD = 0.5


def class_conditional_model(x, t, y):
    """The exact velocity for data ~ N(CLASS_MEANS[y], STD^2 I)."""
    return gaussian_velocity(x, _column(t), _column(CLASS_MEANS[y]), STD)


def test_guidance_scale_one_samples_the_conditional_model():
    flow, noise, y = create_flow(), normal(5), jnp.array([0, 1])
    guided = guided_model_fn(class_conditional_model, 1.0, null_label=2)
    out = flow.sample_ode(guided, SHAPE, None, 40, "heun", model_kwargs={"y": y}, noise=noise)
    cond = flow.sample_ode(class_conditional_model, SHAPE, None, 40, "heun", model_kwargs={"y": y}, noise=noise)
    np.testing.assert_allclose(out, cond, rtol=1e-6, atol=1e-6)
    # Each sample ends at its own class's Gaussian: noise z goes to CLASS_MEANS[y] + STD z.
    np.testing.assert_allclose(out, _column(CLASS_MEANS[y]) + STD * noise, atol=2e-3)


def test_guidance_extrapolates_the_class_means():
    # Gaussian fields with one std are linear in the mean, so the guided field is the exact field of
    # N(m_null + scale (m_y - m_null), STD^2): noise z ends at that mean + STD z.
    scale, flow, noise, y = 3.0, create_flow(), normal(5), jnp.array([0, 1])
    guided = guided_model_fn(class_conditional_model, scale, null_label=2)
    out = jax.jit(lambda z: flow.sample_ode(guided, SHAPE, None, 40, "heun", model_kwargs={"y": y}, noise=z))(noise)
    guided_means = CLASS_MEANS[2] + scale * (CLASS_MEANS[y] - CLASS_MEANS[2])
    np.testing.assert_allclose(out, _column(guided_means) + STD * noise, atol=2e-3)
