"""Presets (ablations/presets.py): each is a data size with a recipe, and two presets of one size differ only
in the recipe's settings."""

import dataclasses

import pytest

from ablations.presets import FLOW_REPA_EVAL, FLOW_REPA_TRAIN, PAPER_EVAL, PAPER_TRAIN, PRESETS
from dit.config import RunConfig
from variants import REGISTERED, resolve


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_a_valid_config_for_every_registered_variant(name):
    for variant in REGISTERED:
        config = PRESETS[name](RunConfig(variant=variant, preset=name, model=resolve(variant)))
        RunConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})  # its checks pass


@pytest.mark.parametrize("paper, newer", [("in100", "in100_flow_repa"), ("demo_paper", "demo_flow_repa")])
def test_the_two_recipes_of_one_size_differ_only_in_the_recipe(paper, newer):
    base = RunConfig(variant="baseline", model=resolve("baseline"))
    a, b = PRESETS[paper](base), PRESETS[newer](base)
    assert a.model == b.model
    if paper == "demo_paper":
        assert a.data == b.data
    else:  # REPA's cache, with the DINOv2 targets, read without flips
        assert (b.data.cache, b.data.flip) == ("data/imagenet100-latents-repa", False)
    for section, paper_fields, newer_fields in (("train", PAPER_TRAIN, FLOW_REPA_TRAIN), ("eval", PAPER_EVAL, FLOW_REPA_EVAL)):
        recipe = set(paper_fields) | set(newer_fields)
        x, y = dataclasses.asdict(getattr(a, section)), dataclasses.asdict(getattr(b, section))
        assert {k for k in x if x[k] != y[k]} <= recipe
        assert all(x[k] == v for k, v in paper_fields.items())
        assert all(y[k] == v for k, v in newer_fields.items() if k != "repa_weight")
    assert (a.train.objective, b.train.objective) == ("ddpm", "flow")
    # REPA at full size (a cache with DINOv2 targets, no flips, as REPA); the digits have no targets.
    assert (b.train.repa_weight, b.data.flip) == ((0.5, False) if newer == "in100_flow_repa" else (0.0, False))


def test_in100_is_the_papers_recipe():
    config = PRESETS["in100"](RunConfig(model=resolve("baseline")))
    assert (config.train.objective, config.train.lr, config.train.beta2, config.train.batch_size) == ("ddpm", 1e-4, 0.999, 256)
    assert (config.eval.sampler or "ddpm", config.eval.sampling_steps, config.eval.guided_channels) == ("ddpm", 250, 3)


def test_prepare_data_builds_the_digits_where_a_preset_points_and_nothing_elsewhere(tmp_path, monkeypatch):
    from ablations.presets import prepare_data
    monkeypatch.chdir(tmp_path)
    smoke = PRESETS["smoke"](RunConfig(variant="baseline", preset="smoke", model=resolve("baseline")))
    prepare_data(smoke, progress=False)
    assert (tmp_path / smoke.data.cache / "manifest.json").exists()
    elsewhere = dataclasses.replace(smoke, data=dataclasses.replace(smoke.data, cache="data/mine/cache-8", builtin=""))
    prepare_data(elsewhere, progress=False)  # the user's own data: checked later, never made here
    assert not (tmp_path / "data" / "mine").exists()
