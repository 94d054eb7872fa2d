"""Parity of the imported official DiT with an independent NumPy reference (tests/official_dit_numpy.py), and of
the imported LightningDiT with an independent PyTorch one (tests/lightningdit_torch.py)."""

from pathlib import Path

import numpy as np
import pytest

from dit.convert import CheckpointError, infer_config, infer_lightning_config, load_lightning_dit, load_official_dit
from tests.official_dit_numpy import forward, random_state_dict

# A copy of the official key layout (shared/reference/official-dit-s2-in100.keys.tsv), kept beside the tests so a
# clone runs them anywhere.
REFERENCE_KEYS = Path(__file__).resolve().parent / "reference" / "official-dit-s2-in100.keys.tsv"
# LightningDiT's layout as its models/lightningdit.py builds it (derived from reading their code, not from the
# reference module), at S/2 with its released switches.
LIGHTNING_KEYS = Path(__file__).resolve().parent / "reference" / "lightningdit-s2-in100.keys.tsv"
S2 = dict(depth=12, hidden=384, patch=2, in_channels=4, input_size=32, num_classes=100)
LIGHTNING_S2 = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6, num_classes=100,
                    use_swiglu=True, use_rope=True, use_rmsnorm=True)


def relative_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(batch, size, channels, num_classes, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    y = rng.integers(0, num_classes + 1, batch)  # the null label included
    return x, t, y


@pytest.fixture(scope="module")
def s2_state_dict():
    return random_state_dict(**S2, seed=0)


def read_layout(path: Path) -> dict[str, tuple]:
    expected = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return expected


def test_random_state_dict_has_the_official_layout(s2_state_dict):
    assert {k: v.shape for k, v in s2_state_dict.items()} == read_layout(REFERENCE_KEYS)


def test_dit_s2_matches_reference(s2_state_dict):
    model = load_official_dit(s2_state_dict, num_classes=100)
    x, t, y = inputs(3, 32, 4, 100)
    out = np.asarray(model(x, t, y))
    ref = forward(s2_state_dict, x.transpose(0, 3, 1, 2), t, y, num_heads=6).transpose(0, 2, 3, 1)
    assert out.shape == (3, 32, 32, 8)
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("hidden, heads, patch, size, learn_sigma", [(128, 2, 4, 16, True), (96, 3, 1, 8, False)])
def test_other_sizes_are_inferred_from_shapes(hidden, heads, patch, size, learn_sigma):
    sd = random_state_dict(depth=3, hidden=hidden, patch=patch, in_channels=4, input_size=size, num_classes=10,
                           mlp_ratio=2.0, learn_sigma=learn_sigma, seed=2)
    cfg = infer_config(sd, num_classes=10, num_heads=heads)
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.input_size, cfg.mlp_ratio, cfg.learn_sigma) == (
        3, hidden, patch, size, 2.0, learn_sigma)
    model = load_official_dit(sd, num_classes=10, num_heads=heads)
    x, t, y = inputs(2, size, 4, 10)
    ref = forward(sd, x.transpose(0, 3, 1, 2), t, y, num_heads=heads).transpose(0, 2, 3, 1)
    assert relative_error(np.asarray(model(x, t, y)), ref) <= 1e-5


def test_official_sizes_get_their_head_count():
    for hidden, heads in [(384, 6), (768, 12), (1024, 16), (1152, 16)]:
        sd = random_state_dict(depth=1, hidden=hidden, patch=8, in_channels=4, input_size=16, num_classes=2)
        assert infer_config(sd, num_classes=2).num_heads == heads


def test_reads_torch_training_checkpoint_and_prefers_ema(tmp_path, s2_state_dict):
    torch = pytest.importorskip("torch")
    ema = {k: torch.from_numpy(v) for k, v in s2_state_dict.items()}
    model_weights = {k: torch.zeros_like(v) for k, v in ema.items()}
    path = tmp_path / "0400000.pt"
    torch.save({"model": model_weights, "ema": ema, "opt": {}, "args": None}, path)
    model = load_official_dit(str(path), num_classes=100)
    x, t, y = inputs(1, 32, 4, 100)
    ref = forward(s2_state_dict, x.transpose(0, 3, 1, 2), t, y, num_heads=6).transpose(0, 2, 3, 1)
    assert relative_error(np.asarray(model(x, t, y)), ref) <= 1e-5


def test_wrong_num_classes_is_a_clear_error(s2_state_dict):
    with pytest.raises(CheckpointError, match="pass num_classes=100"):
        load_official_dit(s2_state_dict, num_classes=1000)


def test_missing_and_unexpected_keys_fail(s2_state_dict):
    partial = {k: v for k, v in s2_state_dict.items() if not k.startswith("blocks.3.mlp")}
    with pytest.raises(CheckpointError, match="blocks.3.mlp.fc1"):
        load_official_dit(partial, num_classes=100)
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_official_dit({**s2_state_dict, "blocks.0.attn.extra.weight": np.zeros((2, 2))}, num_classes=100)
    with pytest.raises(CheckpointError, match="not a facebookresearch/DiT state dict"):
        load_official_dit({"foo": np.zeros(3)}, num_classes=100)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_official_dit(tmp_path / "nope.pt", num_classes=100)


def official_to_diffusers(sd: dict, depth: int) -> dict:
    """The official key layout in diffusers' DiTTransformer2DModel layout (every block holds its own
    copy of the timestep and label embedders there)."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        b, d = f"blocks.{i}", f"transformer_blocks.{i}"
        emb = f"{d}.norm1.emb"
        for suffix in ("weight", "bias"):
            out[f"{emb}.timestep_embedder.linear_1.{suffix}"] = sd[f"t_embedder.mlp.0.{suffix}"]
            out[f"{emb}.timestep_embedder.linear_2.{suffix}"] = sd[f"t_embedder.mlp.2.{suffix}"]
            out[f"{d}.norm1.linear.{suffix}"] = sd[f"{b}.adaLN_modulation.1.{suffix}"]
            for name, chunk in zip(("to_q", "to_k", "to_v"), np.split(sd[f"{b}.attn.qkv.{suffix}"], 3)):
                out[f"{d}.attn1.{name}.{suffix}"] = chunk
            out[f"{d}.attn1.to_out.0.{suffix}"] = sd[f"{b}.attn.proj.{suffix}"]
            out[f"{d}.ff.net.0.proj.{suffix}"] = sd[f"{b}.mlp.fc1.{suffix}"]
            out[f"{d}.ff.net.2.{suffix}"] = sd[f"{b}.mlp.fc2.{suffix}"]
        out[f"{emb}.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return out


def test_dit_s2_matches_diffusers_pytorch_dit(s2_state_dict):
    """A second, PyTorch reference from PyPI: diffusers' DiT, set to the official DiT's two constants."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref_model = diffusers.DiTTransformer2DModel(
        num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
        sample_size=32, patch_size=2, num_embeds_ada_norm=100, norm_eps=1e-6).eval()
    for block in ref_model.transformer_blocks:
        # diffusers divides the timestep frequencies by 127 (downscale_freq_shift=1); official DiT by 128.
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in official_to_diffusers(s2_state_dict, 12).items()}
    missing, unexpected = ref_model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k == "pos_embed.pos_embed" for k in missing)
    x, t, y = inputs(2, 32, 4, 100, seed=3)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), timestep=torch.from_numpy(t),
                        class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(load_official_dit(s2_state_dict, num_classes=100)(x, t, y))
    assert relative_error(ours, ref) <= 1e-5


def lightning_reference(seed: int = 0, **kwargs):
    """A random LightningDiT (tests/lightningdit_torch.py) and its state dict as numpy arrays."""
    pytest.importorskip("torch")
    from tests.lightningdit_torch import random_lightning_dit, state_dict_numpy
    model = random_lightning_dit(seed, **kwargs)
    return model, state_dict_numpy(model)


@pytest.fixture(scope="module")
def lightning_s2():
    return lightning_reference(**LIGHTNING_S2)


def test_lightning_reference_has_the_layout_of_their_code(lightning_s2):
    _, sd = lightning_s2
    assert {k: v.shape for k, v in sd.items()} == read_layout(LIGHTNING_KEYS)


def test_lightning_dit_s2_matches_pytorch_reference(lightning_s2):
    from tests.lightningdit_torch import forward_nhwc
    ref_model, sd = lightning_s2
    x, t, y = inputs(3, 32, 4, 100)
    out = np.asarray(load_lightning_dit(sd, num_classes=100)(x, t, y))
    assert out.shape == (3, 32, 32, 4)  # learn_sigma off, as LightningDiT builds it
    assert relative_error(out, forward_nhwc(ref_model, x, t, y)) <= 1e-5


def test_lightning_dit_s2_is_the_lightning_variant(lightning_s2):
    from variants import resolve
    assert infer_lightning_config(lightning_s2[1], num_classes=100) == resolve("lightning")


@pytest.mark.parametrize("switches", [
    dict(use_qknorm=True, use_rmsnorm=True, use_rope=True, wo_shift=True, learn_sigma=True),
    dict(use_swiglu=True, use_rope=True),  # LayerNorm, no norm weights
    dict(use_rmsnorm=True, mlp_ratio=2.0),  # GELU MLP, absolute position embedding only
])
def test_lightning_switches_and_other_sizes_match_reference(switches):
    from tests.lightningdit_torch import forward_nhwc
    size = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2, num_classes=10)
    ref_model, sd = lightning_reference(seed=3, **size, **switches)
    cfg = infer_lightning_config(sd, num_classes=10)
    assert (cfg.num_heads, cfg.qk_norm, cfg.adaln_shift, cfg.learn_sigma, cfg.uses_rope, cfg.norm_weight) == (
        2, switches.get("use_qknorm", False), not switches.get("wo_shift", False), switches.get("learn_sigma", False),
        switches.get("use_rope", False), switches.get("use_rmsnorm", False))
    x, t, y = inputs(2, 16, 4, 10)
    out = np.asarray(load_lightning_dit(sd, num_classes=10)(x, t, y))
    # LightningDiT's forward drops the learned sigma; ours keeps it after the prediction.
    assert relative_error(out[..., :4], forward_nhwc(ref_model, x, t, y)) <= 1e-5


def test_lightning_training_checkpoint_prefers_ema(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.lightningdit_torch import forward_nhwc
    size = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=1, num_classes=10,
                use_swiglu=True, use_rope=True, use_rmsnorm=True)
    ref_model, _ = lightning_reference(seed=4, **size)
    ema = ref_model.state_dict()
    path = tmp_path / "0080000.pt"
    torch.save({"model": {k: torch.zeros_like(v) for k, v in ema.items()}, "ema": ema, "opt": {}, "config": {}}, path)
    x, t, y = inputs(2, 8, 4, 10)
    out = np.asarray(load_lightning_dit(str(path), num_classes=10, num_heads=1)(x, t, y))
    assert relative_error(out, forward_nhwc(ref_model, x, t, y)) <= 1e-5


def test_lightning_missing_unexpected_and_unsupported_keys_fail():
    size = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    _, sd = lightning_reference(**size, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    with pytest.raises(CheckpointError, match="lacks parameters for: blocks.1.mlp.fc1"):
        load_lightning_dit({k: v for k, v in sd.items() if not k.startswith("blocks.1.mlp.w12")}, num_classes=10)
    with pytest.raises(CheckpointError, match="unexpected key 'blocks.0.attn.extra.weight'.*LightningDiT"):
        load_lightning_dit({**sd, "blocks.0.attn.extra.weight": np.zeros((2, 2))}, num_classes=10)
    with pytest.raises(CheckpointError, match="not a hustvl/LightningDiT state dict"):
        load_lightning_dit({"foo": np.zeros(3)}, num_classes=10)
    with pytest.raises(CheckpointError, match="feat_rope.freqs_sin is not the 2D rotary table"):
        load_lightning_dit({**sd, "feat_rope.freqs_sin": sd["feat_rope.freqs_sin"][:, ::-1]}, num_classes=10)
    _, layer_normed = lightning_reference(**size, use_qknorm=True)
    with pytest.raises(CheckpointError, match="use_qknorm but without use_rmsnorm"):
        load_lightning_dit(layer_normed, num_classes=10)
