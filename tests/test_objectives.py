"""The objectives (dit/objectives.py): each run setting reaches its loss, its samplers and its time convention."""

import jax
import jax.numpy as jnp
import numpy as np

from dit.config import EvalConfig, RunConfig, apply_overrides
from dit.objectives import DDPM, Flow, make_objective


def model_fn(x, t, y):
    return jnp.concatenate([-0.5 * x + t.reshape(-1, 1, 1, 1), x], axis=-1)


def test_settings_reach_the_objective_and_its_loss():
    run = apply_overrides(RunConfig(), ["train.objective=flow", "train.time_sampling=logit_normal",
                                        "train.cosine_loss=2"])
    objective = make_objective(run)
    assert objective == Flow(time_sampling="logit_normal", cosine_weight=2.0)
    assert make_objective(RunConfig()) == DDPM(learn_sigma=True)
    x0, y = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4, 4, 2)), jnp.float32), jnp.arange(4)
    noise = objective.draw(jax.random.key(0), x0)
    loss, level = objective.loss(model_fn, x0, y, noise)
    terms = objective.flow.training_losses(model_fn, x0, noise[0], noise[1], y=y)
    np.testing.assert_allclose(loss, terms["mse"] + 2.0 * terms["cosine"], rtol=1e-6)
    np.testing.assert_allclose(level, 1.0 - noise[0])  # flow's t = 0 is noise; the level's 1 is noise
    _, ddpm_level = make_objective(RunConfig()).loss(model_fn, x0, y, (jnp.array([0, 250, 500, 999]), noise[1]))
    np.testing.assert_allclose(ddpm_level, [0.0, 0.25, 0.5, 0.999])


def test_guidance_interval_levels_map_to_each_objectives_time():
    _, flow_time = Flow().sampling(EvalConfig(sampler="euler"))
    _, ddpm_time = DDPM().sampling(EvalConfig(sampling_steps=250))
    assert flow_time(0.11) == 0.89  # level 0.11 (near the data) is flow time 0.89
    assert ddpm_time(1.0) == 999 and ddpm_time(0.5) == 499.5  # DiT's respaced steps keep 999 as the noisiest
