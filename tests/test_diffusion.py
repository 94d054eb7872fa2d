"""The Gaussian diffusion against closed forms and the float64 reference of the official DiT/ADM math,
and the samplers against distributions they must reproduce exactly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit.diffusion import create_diffusion, space_timesteps
from dit.guidance import guided_model_fn
from tests import official_diffusion_numpy as ref

B, H, W, C = 6, 4, 4, 3
# Every example its own timestep: the decoder term (0), the first KL term (1), and the last step (999).
T_FULL = np.array([0, 1, 17, 500, 998, 999])
T_250 = np.array([0, 1, 17, 125, 248, 249])


def nchw(x) -> np.ndarray:
    return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


def loss_case(learn_sigma: bool = True, seed: int = 0):
    """x0 in [-1, 1] with pixels on both edge bins, noise, and a fixed model output: epsilon off the
    noise by N(0, 1), and v uniform in [-1, 1].

    Much worse epsilons put decoder pixels 4+ std out, where float32 (the official code's as ours)
    loses the difference of two CDFs near 1; there float32 cannot meet a 1e-5 relative tolerance.
    """
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (B, H, W, C))
    x0[:, 0, 0, 0], x0[:, 1, 1, 1] = -1.0, 1.0
    noise = rng.normal(size=(B, H, W, C))
    output = noise + rng.normal(size=(B, H, W, C))
    if learn_sigma:
        output = np.concatenate([output, rng.uniform(-1, 1, (B, H, W, C))], axis=-1)
    return tuple(jnp.asarray(a, jnp.float32) for a in (x0, noise, output))


def constant_model(output):
    return lambda x, t, **kwargs: output


# ---- Schedule, forward process and posterior ------------------------------------------------------

def test_linear_schedule_endpoints():
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == 1000
    # Not exact: as the official code, even "" recomputes the betas from alphas_cumprod.
    assert diffusion.betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert diffusion.betas[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(np.diff(diffusion.betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    assert diffusion.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-4)
    np.testing.assert_array_equal(diffusion.timestep_map, np.arange(1000))
    # ADM scales the endpoints so that fewer steps span the same noise levels.
    short = create_diffusion("", diffusion_steps=500)
    assert short.betas[0] == pytest.approx(2e-4, rel=1e-12) and short.betas[-1] == pytest.approx(0.04, rel=1e-12)


def test_q_sample_is_the_closed_form():
    x0, noise, _ = loss_case()
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[T_FULL][:, None, None, None]
    got = create_diffusion("").q_sample(x0, jnp.asarray(T_FULL), noise)
    np.testing.assert_allclose(got, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise, rtol=1e-5, atol=1e-6)


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x0) from the prior N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) on x_{t-1} and the
    likelihood N(sqrt(alpha_t) x_{t-1}, beta_t) of x_t."""
    diffusion = create_diffusion("")
    x0, x_t, _ = loss_case()  # any x_t will do
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, jnp.asarray(T_FULL))
    betas = np.linspace(1e-4, 0.02, 1000)
    abar_prev = np.append(1.0, np.cumprod(1 - betas))[T_FULL][:, None, None, None]
    beta = betas[T_FULL][:, None, None, None]
    x0, x_t = np.asarray(x0, np.float64), np.asarray(x_t, np.float64)

    later = T_FULL > 0
    precision = 1 / (1 - abar_prev[later]) + (1 - beta[later]) / beta[later]
    want_mean = (np.sqrt(abar_prev[later]) * x0[later] / (1 - abar_prev[later])
                 + np.sqrt(1 - beta[later]) * x_t[later] / beta[later]) / precision
    np.testing.assert_allclose(mean[later], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[later], np.broadcast_to(1 / precision, want_mean.shape), rtol=1e-5)
    # At t = 0 the posterior is x0 itself; its log variance is clipped to the t = 1 value.
    np.testing.assert_allclose(mean[~later], x0[~later], rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(var[~later]) == 0)
    np.testing.assert_allclose(log_var[~later], np.log(diffusion.posterior_variance[1]), rtol=1e-6)
    np.testing.assert_allclose(log_var[later], np.log(var[later]), rtol=1e-5)


# ---- Respacing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, spec", [(1000, "250"), (1000, "27"), (1000, "ddim50"), (1000, "100,50,10"),
                                         (300, "10,15,20")])
def test_space_timesteps_matches_the_reference(steps, spec):
    assert space_timesteps(steps, spec) == ref.space_timesteps(steps, spec)


def test_space_timesteps_rejects_impossible_counts():
    with pytest.raises(ValueError):
        space_timesteps(10, "11")
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim7")


def test_respaced_diffusion_keeps_the_original_alphas_cumprod():
    base, spaced = create_diffusion(""), create_diffusion("250")
    assert spaced.num_timesteps == 250
    assert spaced.timestep_map[0] == 0 and spaced.timestep_map[-1] == 999
    assert np.all(np.diff(spaced.timestep_map) > 0)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-12)
    np.testing.assert_allclose(spaced.betas, ref.spaced_betas(ref.linear_betas(1000), spaced.timestep_map),
                               rtol=1e-12)


def test_training_losses_call_the_model_with_original_timesteps():
    diffusion = create_diffusion("10")
    assert list(diffusion.timestep_map) == list(range(0, 1000, 111))
    x0, noise, output = loss_case()
    seen = []

    def model_fn(x, t):
        seen.append(np.asarray(t).tolist())
        return output

    diffusion.training_losses(model_fn, x0, jnp.asarray([0, 1, 2, 5, 8, 9]), noise)
    assert seen == [[0, 111, 222, 555, 888, 999]]


def test_sampler_calls_the_model_with_original_timesteps():
    # DDIM shares this path; the exact-model sampler tests below would also fail on spaced timesteps.
    diffusion = create_diffusion("10")
    seen = []

    def model_fn(x, t):
        jax.debug.callback(lambda t: seen.append(np.asarray(t).tolist()), t, ordered=True)
        return jnp.concatenate([0.1 * x, jnp.zeros_like(x)], axis=-1)

    diffusion.p_sample_loop(model_fn, (2, 4, 4, 3), jax.random.key(0))
    jax.effects_barrier()
    assert seen == [[t, t] for t in range(999, -1, -111)]


# ---- Training losses against the official math --------------------------------------------------

@pytest.mark.parametrize("respacing, t", [("", T_FULL), ("250", T_250)])
def test_training_losses_match_the_official_math(respacing, t):
    diffusion = create_diffusion(respacing)
    x0, noise, output = loss_case()
    got = diffusion.training_losses(constant_model(output), x0, jnp.asarray(t), noise, y=jnp.zeros(B, jnp.int32))
    betas = ref.spaced_betas(ref.linear_betas(1000), diffusion.timestep_map)
    want = ref.training_losses(betas, nchw(output), nchw(x0), t, nchw(noise))
    for name in ("loss", "mse", "vb"):
        assert got[name].shape == (B,)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=0, err_msg=name)
    assert np.all(np.asarray(got["vb"]) > 0)


def test_training_losses_without_learned_sigma_are_the_mse():
    diffusion = create_diffusion("", learn_sigma=False)
    x0, noise, output = loss_case(learn_sigma=False)
    got = diffusion.training_losses(constant_model(output), x0, jnp.asarray(T_FULL), noise)
    want = ref.training_losses(ref.linear_betas(1000), nchw(output), nchw(x0), T_FULL, nchw(noise), learn_sigma=False)
    np.testing.assert_allclose(got["mse"], want["mse"], rtol=1e-5)
    np.testing.assert_array_equal(got["loss"], got["mse"])
    np.testing.assert_array_equal(got["vb"], np.zeros(B))


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_p_mean_variance_matches_the_official_math(learn_sigma):
    diffusion = create_diffusion("", learn_sigma=learn_sigma)
    x_t, _, output = loss_case(learn_sigma)
    got = diffusion.p_mean_variance(constant_model(output), x_t, jnp.asarray(T_FULL))
    mean, log_var, pred_x0 = ref.model_step(ref.linear_betas(1000), nchw(output), nchw(x_t), T_FULL, learn_sigma)
    np.testing.assert_allclose(nchw(got.pred_x0), pred_x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nchw(got.mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nchw(got.log_variance), log_var, rtol=1e-5)
    np.testing.assert_allclose(got.variance, np.exp(got.log_variance), rtol=1e-6)

    clipped = diffusion.p_mean_variance(constant_model(output), x_t, jnp.asarray(T_FULL), clip_denoised=True)
    assert np.abs(np.asarray(got.pred_x0)).max() > 1  # so that clipping has work to do
    np.testing.assert_array_equal(clipped.pred_x0, jnp.clip(got.pred_x0, -1, 1))
    want_mean, _, _ = diffusion.q_posterior_mean_variance(clipped.pred_x0, x_t, jnp.asarray(T_FULL))
    np.testing.assert_allclose(clipped.mean, want_mean, rtol=1e-6, atol=1e-7)


def test_vb_trains_only_the_variance():
    diffusion = create_diffusion("")
    x0, noise, output = loss_case()
    t = jnp.asarray(T_FULL)

    def term(name):
        return jax.grad(lambda out: diffusion.training_losses(constant_model(out), x0, t, noise)[name].sum())

    d_vb, d_mse = jax.jit(lambda out: (term("vb")(out), term("mse")(out)))(output)
    assert np.all(np.asarray(d_vb[..., :C]) == 0)
    assert np.all(np.asarray(d_mse[..., :C]) != 0)
    assert np.all(np.asarray(d_vb[..., C:]).reshape(B, -1).any(axis=1))
    # d(vb)/dv against central differences of the float64 reference at one pixel. Only for early t:
    # later, beta_t and the posterior variance nearly coincide, vb hardly depends on v (~1e-9) and the
    # float32 gradient has no relative precision left.
    step = np.zeros((B, C * 2, H, W))
    step[:, C + 1, 1, 2] = 1e-5
    vb = functools.partial(ref.training_losses, ref.linear_betas(1000), x0=nchw(x0), t=T_FULL, noise=nchw(noise))
    numeric = (vb(nchw(output) + step)["vb"] - vb(nchw(output) - step)["vb"]) / 2e-5
    early = T_FULL < 100
    assert np.all(np.abs(numeric[early]) > 1e-5)
    np.testing.assert_allclose(d_vb[:, 1, 2, C + 1][early], numeric[early], rtol=1e-4)


# ---- Samplers -------------------------------------------------------------------------------------

def toy_model(x, t):
    return jnp.concatenate([0.1 * x + 1e-4 * t[:, None, None, None], jnp.tanh(x)], axis=-1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_shape_and_keys(sampler):
    diffusion = create_diffusion("10")
    run = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    sample = jax.jit(lambda key: run(toy_model, (2, 4, 4, 3), key))
    a, again, other = sample(jax.random.key(0)), sample(jax.random.key(0)), sample(jax.random.key(1))
    assert a.shape == (2, 4, 4, 3) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, again)
    assert np.abs(np.asarray(a - other)).min() > 0


def test_ddim_with_given_noise_uses_the_key_only_when_eta_is_positive():
    diffusion = create_diffusion("10")
    sample = jax.jit(lambda key, noise, eta: diffusion.ddim_sample_loop(toy_model, noise.shape, key, eta, noise=noise))
    noise = jax.random.normal(jax.random.key(7), (2, 4, 4, 3))
    np.testing.assert_array_equal(sample(jax.random.key(0), noise, 0.0), sample(jax.random.key(1), noise, 0.0))
    assert np.abs(np.asarray(sample(jax.random.key(0), noise, 1.0) - sample(jax.random.key(1), noise, 1.0))).min() > 0


SHAPE = (1024, 4, 4, 1)  # 16384 independent scalar chains: the exact models below act per element


@functools.lru_cache
def exact_data_sampler(respacing: str, sampler: str):
    """A jitted sampler whose model is the exact epsilon predictor for data x0 ~ N(data_mean, data_std^2).

    For Gaussian data E[eps | x_t] = sqrt(1 - abar)(x_t - sqrt(abar) mean) / (abar std^2 + 1 - abar),
    with abar at the ORIGINAL timestep the model is called with.
    """
    diffusion = create_diffusion(respacing)
    abar = create_diffusion("").alphas_cumprod
    sqrt_abar, sqrt_one_minus_abar = (jnp.asarray(a, jnp.float32) for a in (np.sqrt(abar), np.sqrt(1 - abar)))

    def run(key, data_mean, data_std, v, eta):
        def model_fn(x, t):
            s, s1 = sqrt_abar[t][:, None, None, None], sqrt_one_minus_abar[t][:, None, None, None]
            eps = s1 * (x - s * data_mean) / (s**2 * data_std**2 + s1**2)
            return jnp.concatenate([eps, jnp.full_like(eps, v)], axis=-1)

        if sampler == "ddpm":
            return diffusion.p_sample_loop(model_fn, SHAPE, key)
        return diffusion.ddim_sample_loop(model_fn, SHAPE, key, eta=eta)

    return jax.jit(run)


@pytest.mark.parametrize("respacing, sampler", [("250", "ddpm"), ("50", "ddim")])
def test_samplers_end_on_a_point_mass(respacing, sampler):
    # With the exact predictor every x0 estimate is x*, and the last step's posterior mean is exactly
    # its x0 estimate (abar_prev = 1), with no noise added: the sample is x* up to float32 rounding
    # (we see 1e-7). Noise at the last step would move it by ~1e-2, a wrong x0 estimate by more.
    x_star = jax.random.uniform(jax.random.key(3), SHAPE, minval=-1, maxval=1)
    sample = exact_data_sampler(respacing, sampler)(jax.random.key(0), x_star, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(sample, x_star, rtol=0, atol=1e-6)


def exact_sample_moments(betas, data_mean, data_std, v, ddim_eta=None):
    """Mean and std of a sampler's output for Gaussian data, by pushing mean and variance through its
    steps, which are affine in x_t with Gaussian noise when the model is exact."""
    abar = np.cumprod(1 - betas)

    def step(x, t):
        a = abar[t]
        eps = np.sqrt(1 - a) * (x - np.sqrt(a) * data_mean) / (a * data_std**2 + 1 - a)
        output, x_t, t_arr = np.array([eps, v]).reshape(1, 2, 1, 1), np.full((1, 1, 1, 1), x), np.array([t])
        if ddim_eta is None:
            mean, log_var, _ = ref.model_step(betas, output, x_t, t_arr)
            return mean.item(), (np.exp(0.5 * log_var).item() if t > 0 else 0.0)
        mean, std = ref.ddim_step(betas, output, x_t, t_arr, ddim_eta)
        return mean.item(), std.item()

    mean, var = 0.0, 1.0
    for t in reversed(range(len(betas))):
        offset, std = step(0.0, t)
        slope = step(1.0, t)[0] - offset
        mean, var = slope * mean + offset, slope**2 * var + std**2
    return mean, np.sqrt(var)


@pytest.mark.parametrize("respacing, sampler, v, eta", [("250", "ddpm", -1.0, 0.0), ("250", "ddpm", 1.0, 0.0),
                                                        ("50", "ddim", 0.0, 0.0), ("50", "ddim", 0.0, 1.0)])
def test_samplers_reproduce_the_exact_output_distribution_for_gaussian_data(respacing, sampler, v, eta):
    data_mean, data_std = 0.5, 0.3
    sample = exact_data_sampler(respacing, sampler)(jax.random.key(1), jnp.full(SHAPE, data_mean), data_std, v, eta)
    betas = ref.spaced_betas(ref.linear_betas(1000), create_diffusion(respacing).timestep_map)
    mean, std = exact_sample_moments(betas, data_mean, data_std, v, eta if sampler == "ddim" else None)
    # The discretised samplers miss the data std 0.3 by up to 16% (0.252 for 50 DDIM steps with eta 1),
    # so they are held to their exact output moments: within 4 standard errors of the sample moments
    # (0.7% of std for 16384 draws), which tells v = -1 from v = 1 (std 0.287 vs 0.304).
    n = np.prod(SHAPE)
    assert abs(float(sample.mean()) - mean) < 4 * std / np.sqrt(n)
    assert abs(float(sample.std()) - std) < 4 * std / np.sqrt(2 * n)


def test_classifier_free_guidance_in_a_sampler():
    null_label = 10

    def model_fn(x, t, y):
        label = y[:, None, None, None].astype(jnp.float32)
        return jnp.concatenate([0.5 * x + 0.05 * label + 1e-4 * t[:, None, None, None], jnp.tanh(x - 0.1 * label)],
                               axis=-1)

    def by_hand(scale):
        def fn(x, t, y):
            cond, uncond = model_fn(x, t, y), model_fn(x, t, jnp.full_like(y, null_label))
            guided_eps = uncond[..., :C] + scale * (cond[..., :C] - uncond[..., :C])
            return jnp.concatenate([guided_eps, cond[..., C:]], axis=-1)
        return fn

    diffusion = create_diffusion("10")
    y = jnp.asarray([1, 7])

    def sample(fn):
        return diffusion.p_sample_loop(fn, (2, H, W, C), jax.random.key(0), model_kwargs={"y": y})

    conditional = sample(model_fn)
    guided = sample(guided_model_fn(model_fn, 4.0, null_label))
    np.testing.assert_allclose(guided, sample(by_hand(4.0)), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(guided - conditional)).max() > 0.1
    np.testing.assert_array_equal(sample(guided_model_fn(model_fn, 1.0, null_label)), conditional)
