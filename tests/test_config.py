"""Configs: overrides reach every field, bad values are clear errors."""

import dataclasses

import pytest

from dit.config import ConfigError, ModelConfig, RunConfig, apply_overrides, dit_config, to_dict


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
])
def test_bad_overrides_fail_with_a_clear_message(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [assignment])


def test_rope_needs_head_dim_divisible_by_four():
    with pytest.raises(ConfigError, match="divisible by 4"):
        ModelConfig(hidden_size=60, num_heads=6, pos_embed="rope")


def test_named_sizes_and_serialisation():
    assert (dit_config("XL/2").depth, dit_config("XL/2").hidden_size, dit_config("B/4").patch_size) == (28, 1152, 4)
    with pytest.raises(ConfigError):
        dit_config("M/2")
    assert to_dict(RunConfig())["model"]["hidden_size"] == 384
