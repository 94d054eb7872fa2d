"""Configs: overrides reach every field, bad values are clear errors."""

import dataclasses

import pytest

from dit.config import (ConfigError, EvalConfig, ModelConfig, RunConfig, TrainConfig, apply_overrides, dit_config,
                        to_dict)


def test_overrides_reach_every_field_with_types():
    cfg = apply_overrides(RunConfig(), ["model.depth=13", "train.steps=7", "train.lr=3e-4", "model.qk_norm=true",
                                        "train.objective=flow", "eval.every=5", "model.pos_embed=rope"])
    assert (cfg.model.depth, cfg.train.steps, cfg.train.lr, cfg.model.qk_norm) == (13, 7, 3e-4, True)
    assert (cfg.train.objective, cfg.eval.every, cfg.model.pos_embed) == ("flow", 5, "rope")


def test_every_field_is_settable():
    cfg = RunConfig()
    for section in ("model", "train", "eval"):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            text = str(value).lower() if isinstance(value, bool) else str(value)
            assert apply_overrides(cfg, [f"{section}.{f.name}={text}"]) == cfg


@pytest.mark.parametrize("assignment, message", [
    ("model.depht=3", "Did you mean model.depth"),
    ("modle.depth=3", "unknown section"),
    ("model.depth", "section.field=value"),
    ("train.steps=abc", "not a valid int"),
    ("train.objective=score", "ddpm, flow"),
    ("model.num_heads=5", "not divisible"),
    ("model.patch_size=3", "not divisible"),
    ("model.dtype=float8", "float32, bfloat16, float16"),
    ("train.steps=0", "positive"),
    ("train.lr=-1", "train.lr=-1.0 must be a finite number > 0"),
    ("train.lr=nan", "train.lr=nan must be a finite number > 0"),
    ("train.warmup_steps=-10", "train.warmup_steps=-10 must be a finite number >= 0"),
    ("train.keep_every=-1", "train.keep_every=-1 must be a finite number >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be a finite number >= 0"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0 must be a finite number >= 0"),
    ("train.adam_eps=0", "train.adam_eps=0.0 must be a finite number > 0"),
    ("train.beta1=1", r"train.beta1=1.0 must lie in \[0, 1\)"),
    ("train.beta2=-0.5", r"train.beta2=-0.5 must lie in \[0, 1\)"),
    ("train.split_state=maybe", "'maybe' is not a valid bool"),
    ("model.mlp_ratio=0", "model.mlp_ratio=0.0 must be a finite number > 0"),
    ("model.swiglu_hidden=-64", "model.swiglu_hidden=-64 must be >= 0"),
    ("model.conv_stem_width=0", "model.conv_stem_width=0 must be a positive integer"),
    ("eval.ddim_eta=-1", "eval.ddim_eta=-1.0 must be a finite number >= 0"),
    ("eval.cfg_scale=inf", "eval.cfg_scale=inf must be a finite number >= 0"),
    ("eval.guided_channels=-1", "eval.guided_channels=-1 must be a finite number >= 0"),
    ("train.cosine_loss=1", "train.cosine_loss=1.0 is a term of the flow objective's velocity loss"),
    ("eval.timestep_shift=0.3", "eval.timestep_shift=0.3 shifts the time grid of the flow ODE samplers"),
    ("eval.timestep_shift=-1", "eval.timestep_shift=-1.0 must be a finite number >= 0"),
    ("data.builtin=mnist", "data.builtin='mnist': the built-in dataset is 'digits'"),
    ("data.builtin=digits", "data.builtin=digits needs data.cache"),
])
def test_bad_overrides_fail_with_a_clear_message(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [assignment])


def test_the_state_is_split_over_accelerators_and_kept_whole_on_cpus_unless_set():
    auto = RunConfig().train
    assert auto.state_split_on("tpu") and auto.state_split_on("gpu") and not auto.state_split_on("cpu")
    split = apply_overrides(RunConfig(), ["train.split_state=true"]).train
    assert split.state_split_on("cpu")
    assert not apply_overrides(RunConfig(), ["train.split_state=false"]).train.state_split_on("tpu")


def test_overrides_are_checked_on_their_final_values_whatever_the_order():
    for assignments in (["train.grad_accum=3", "train.batch_size=12"], ["eval.sampler=euler", "train.objective=flow"]):
        for order in (assignments, assignments[::-1]):
            assert apply_overrides(RunConfig(), order) == apply_overrides(RunConfig(), assignments[::-1])
    cfg = apply_overrides(RunConfig(), ["train.grad_accum=3", "train.batch_size=12", "train.steps=5", "train.steps=7"])
    assert (cfg.train.grad_accum, cfg.train.batch_size, cfg.train.steps) == (3, 12, 7)  # the last of two wins


# The samplers of each objective ("" is the objective's default and always fits).
FITS = {"ddpm": ("", "ddpm", "ddim"), "flow": ("", "euler", "heun", "sde")}


@pytest.mark.parametrize("objective", FITS)
@pytest.mark.parametrize("sampler", ["", "ddpm", "ddim", "euler", "heun", "sde"])
def test_the_sampler_must_fit_the_objective_when_the_config_is_built(objective, sampler):
    assignments = [f"train.objective={objective}", f"eval.sampler={sampler}"]
    for order in (assignments, assignments[::-1]):
        if sampler in FITS[objective]:
            cfg = apply_overrides(RunConfig(), order)
            assert (cfg.train.objective, cfg.eval.sampler) == (objective, sampler)
        else:
            with pytest.raises(ConfigError, match=f"eval.sampler='{sampler}' does not fit train.objective={objective}"):
                apply_overrides(RunConfig(), order)
    if sampler not in FITS[objective]:  # also without --set, as from a saved config.json
        with pytest.raises(ConfigError, match="does not fit"):
            RunConfig(train=TrainConfig(objective=objective), eval=EvalConfig(sampler=sampler))


def test_rope_needs_head_dim_divisible_by_four():
    with pytest.raises(ConfigError, match="divisible by 4"):
        ModelConfig(hidden_size=60, num_heads=6, pos_embed="rope")


def test_named_sizes_and_serialisation():
    assert (dit_config("XL/2").depth, dit_config("XL/2").hidden_size, dit_config("B/4").patch_size) == (28, 1152, 4)
    with pytest.raises(ConfigError):
        dit_config("M/2")
    assert to_dict(RunConfig())["model"]["hidden_size"] == 384


def test_lightningdit_additions_fit_the_flow_objective_and_its_ode_samplers():
    cfg = apply_overrides(RunConfig(), ["train.objective=flow", "train.cosine_loss=1", "eval.sampler=euler",
                                        "eval.timestep_shift=0.3"])
    assert (cfg.train.cosine_loss, cfg.eval.timestep_shift) == (1.0, 0.3)
    with pytest.raises(ConfigError, match="the sampler is sde"):  # flow's default sampler is the SDE
        apply_overrides(RunConfig(), ["train.objective=flow", "eval.timestep_shift=0.3"])


def test_repa_settings_are_checked_with_the_model_and_data():
    with pytest.raises(ConfigError, match="set data.flip=false"):
        apply_overrides(RunConfig(), ["train.repa_weight=0.5"])
    with pytest.raises(ConfigError, match="train.repa_block=13 must name a block of the model's 12"):
        apply_overrides(RunConfig(), ["train.repa_weight=0.5", "data.flip=false", "train.repa_block=13"])
    cfg = apply_overrides(RunConfig(), ["train.repa_weight=0.5", "data.flip=false"])
    assert cfg.repa_block == 4  # a third of DiT-S's 12 blocks
