"""Parity of the imported official DiT with an independent NumPy reference (tests/official_dit_numpy.py)."""

from pathlib import Path

import numpy as np
import pytest

from dit.convert import CheckpointError, infer_config, load_official_dit
from tests.official_dit_numpy import forward, random_state_dict

REFERENCE_KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official-dit-s2-in100.keys.tsv"
S2 = dict(depth=12, hidden=384, patch=2, in_channels=4, input_size=32, num_classes=100)


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


def test_random_state_dict_has_the_official_layout(s2_state_dict):
    if not REFERENCE_KEYS.exists():
        pytest.skip("shared/reference is not beside the checkout")
    expected = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert {k: v.shape for k, v in s2_state_dict.items()} == expected


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
