"""The variant registry: composition, real switches, the budget, and `python -m variants`."""

import dataclasses
import json
import subprocess
import sys

import pytest
from flax import nnx

from ablations.presets import smoke
from dit.config import RunConfig
from dit.errors import UserError
from dit.layers import ConvStem, SwiGluMlp
from dit.model import DiT
from tests.helpers import batch
from variants import BUDGET, REGISTERED, OverBudget, UnknownVariant, check_budget, resolve, split_features
from variants.registry import ALIASES, FEATURES


def test_names_compose_and_aliases_expand():
    assert split_features("rope_swiglu") == ["rope", "swiglu"]
    assert split_features("shared_adaln_deep17") == ["shared_adaln", "deep17"]
    assert split_features("lightning") == ["sincos_rope", "swiglu", "rmsnorm_weighted", "no_sigma"]
    assert resolve("rope_swiglu") == dataclasses.replace(resolve("baseline"), pos_embed="rope", mlp="swiglu")
    assert resolve("lightning") == resolve(ALIASES["lightning"])


def test_unknown_name_lists_known_ones_and_closest():
    with pytest.raises(UnknownVariant, match="closest known name is 'rope_swiglu'") as error:
        resolve("rope_swigl")
    assert "baseline" in str(error.value)


def test_each_feature_is_a_real_switch():
    base = DiT(resolve("baseline"), rngs=nnx.Rngs(0))
    assert isinstance(DiT(resolve("swiglu"), rngs=nnx.Rngs(0)).blocks.mlp, SwiGluMlp)
    assert isinstance(DiT(resolve("convstem"), rngs=nnx.Rngs(0)).x_embedder, ConvStem)
    assert DiT(resolve("qknorm"), rngs=nnx.Rngs(0)).blocks.attn.q_scale is not None
    shared = DiT(resolve("shared_adaln"), rngs=nnx.Rngs(0))
    assert shared.shared_adaln is not None and shared.blocks.adaln_modulation is None
    assert base.blocks.attn.q_scale is None and base.shared_adaln is None
    assert resolve("rope").pos_embed == "rope" and resolve("rmsnorm").norm == "rmsnorm"
    assert resolve("patch1").patch_size == 1


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_variant_fits_builds_and_runs(name):
    cost = check_budget(name, resolve(name))
    assert 0 < cost.params <= BUDGET and cost.gflops > 0
    cfg = smoke(RunConfig(model=resolve(name))).model  # the same features, shrunk to run in a second
    x, t, y = batch(cfg, n=2)
    assert DiT(cfg, rngs=nnx.Rngs(0))(x, t, y).shape == (2, 8, 8, cfg.out_channels)


def test_expected_parameter_counts():
    assert check_budget("baseline", resolve("baseline")).params == 32_519_456
    assert check_budget("rope", resolve("rope")).params == 32_519_456  # RoPE adds no parameters
    # adaLN-single frees 11 of the 12 modulation networks (887,040 each) and adds 12 offsets of 2,304.
    assert check_budget("shared_adaln", resolve("shared_adaln")).params == 32_519_456 - 11 * 887_040 + 12 * 2_304


def test_lightning_is_lightningdits_architecture():
    cfg = resolve("lightning")
    # LightningDiT's released switches (use_swiglu, use_rope, use_rmsnorm; no QK-norm, shifts kept) and its
    # class default learn_sigma=False; tests/test_convert.py checks this config against a LightningDiT state dict.
    assert (cfg.pos_embed, cfg.mlp, cfg.mlp_hidden, cfg.norm, cfg.final_norm, cfg.norm_weight) == (
        "sincos_rope", "swiglu", 1024, "rmsnorm", "rmsnorm", True)
    assert (cfg.qk_norm, cfg.adaln_shift, cfg.learn_sigma, cfg.adaln) == (False, True, False, "per_block")
    # The baseline + 12 x 512 SwiGLU biases + 25 norm weights of 384 - the sigma outputs (384 x 16 + 16).
    assert check_budget("lightning", cfg).params == 32_519_456 + 12 * 512 + 25 * 384 - 6_160 == 32_529_040
    with pytest.raises(UserError, match="disagree on model.pos_embed"):
        resolve("lightning_rope")


def test_wo_shift_drops_the_shift_rows_of_every_modulation():
    assert check_budget("wo_shift", resolve("wo_shift")).params == 32_519_456 - 12 * 2 * (384 * 384 + 384)


def test_budget_refuses_an_over_budget_config():
    with pytest.raises(OverBudget, match="over the budget of 33,000,000 by 2,179,424"):
        check_budget("baseline", dataclasses.replace(resolve("baseline"), depth=13))
    with pytest.raises(OverBudget):
        check_budget("deep17", resolve("deep17"))  # depth without the freed modulation does not fit


def test_features_that_disagree_fail(monkeypatch):
    monkeypatch.setitem(FEATURES, "depth3", {"depth": 3})
    assert resolve("shared_adaln_depth3").depth == 3
    with pytest.raises(Exception, match="disagree on model.depth"):
        resolve("deep17_depth3")


@pytest.mark.parametrize("name, feature", [("rope_rope", "rope"), ("swiglu_rope_swiglu", "swiglu"),
                                           ("lightning_swiglu", "swiglu")])
def test_a_feature_named_twice_fails(name, feature):
    with pytest.raises(UserError, match=f"variant '{name}' names the feature '{feature}' twice"):
        resolve(name)


def test_command_line_lists_every_variant_as_json():
    out = subprocess.run([sys.executable, "-m", "variants", "--json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == list(REGISTERED)
    baseline = rows[0]
    assert baseline["params"] == 32_519_456 and round(baseline["gflops"], 2) == 6.06 and baseline["within_budget"]
