"""DINOv2 and REPA's pieces against their references: transformers' Dinov2Model (a random tiny one, written
by its own save_pretrained), torch's bicubic interpolation, REPA's preprocessing and loss, written here in torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dit.dinov2 import Dinov2, Dinov2Config, bicubic_matrix, count_params, hf_key_shapes, infer_config, load_model
from dit.errors import UserError
from dit.repa import RepaProjector, dinov2_features, load_dinov2, preprocess, repa_loss

torch = pytest.importorskip("torch")
F = torch.nn.functional
transformers = pytest.importorskip("transformers")

# A tiny DINOv2 whose position table covers a 25x25 grid (350 pixels), so running it at 224 (16x16) resamples it.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=350)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the transformers model, the folder its save_pretrained wrote), every parameter random and non-trivial."""
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Unit-scale positions, so a wrong resampling shows; the rest (LayerScale, norms included) perturbed.
            p.copy_(torch.randn_like(p) if name.endswith("position_embeddings") else p + 0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("dinov2-tiny")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def encoder(tiny):
    return load_dinov2(tiny[1])


def _torch(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x))


# ---------------------------------------------------------------------------------------------------------
# torch's bicubic


@pytest.mark.parametrize("size_in,size_out", [(256, 224), (37, 16), (25, 16), (7, 16), (16, 16), (10, 3)])
@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_matches_torch(size_in, size_out, antialias):
    x = np.random.default_rng(0).normal(size=(1, 3, size_in, size_in)).astype(np.float32)
    reference = F.interpolate(_torch(x), size=(size_out, size_out), mode="bicubic", align_corners=False,
                              antialias=antialias).numpy()
    m = bicubic_matrix(size_in, size_out, antialias).astype(np.float64)
    ours = m @ x.astype(np.float64) @ m.T
    assert np.abs(ours - reference).max() < 1e-5


# ---------------------------------------------------------------------------------------------------------
# DINOv2 against transformers


def test_key_layout_is_transformers(tiny):
    _, folder = tiny
    shapes = {k: tuple(v.shape) for k, v in load_file(folder / "model.safetensors").items()}
    cfg = infer_config(shapes, num_heads=4)
    assert (cfg.hidden_size, cfg.depth, cfg.mlp_hidden, cfg.patch_size, cfg.pretrained_grid) == (64, 2, 256, 14, 25)
    assert hf_key_shapes(cfg) == shapes


def test_parity_with_transformers(tiny):
    hf, folder = tiny
    model = load_model(folder, image_size=224)  # the head count from the config.json beside the weights
    assert model.cfg.num_heads == 4
    x = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        reference = hf(pixel_values=_torch(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    ours = np.asarray(model(jnp.asarray(x)))
    error = relative_error(ours[:, 1:], reference[:, 1:])
    print(f"patch tokens vs transformers: relative error {error:.2e}")
    assert error <= 1e-4
    assert relative_error(ours[:, 0], reference[:, 0]) <= 1e-4


def _repa_reference(hf, images: np.ndarray) -> np.ndarray:
    """REPA's targets in torch: load_encoders' one-time timm resample of the position table (timm's
    resample_abs_pos_embed: bicubic, antialias=True, to 16x16), preprocess_raw_image, x_norm_patchtokens."""
    table = hf.embeddings.position_embeddings.detach()
    d = table.shape[-1]
    g0 = int(round((table.shape[1] - 1) ** 0.5))
    grid = F.interpolate(table[:, 1:].reshape(1, g0, g0, d).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                         antialias=True).permute(0, 2, 3, 1).reshape(1, 256, d)
    hf.embeddings.position_embeddings = torch.nn.Parameter(torch.cat([table[:, :1], grid], dim=1))
    try:
        x = _torch(images).permute(0, 3, 1, 2).float() / 255.0
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = F.interpolate((x - mean) / std, 224, mode="bicubic")
        with torch.no_grad():  # 256 patches = the table's 256 entries: transformers uses the table as it is
            return hf(pixel_values=x).last_hidden_state[:, 1:].numpy()
    finally:
        hf.embeddings.position_embeddings = torch.nn.Parameter(table)


def test_preprocess_matches_repa():
    images = np.random.default_rng(2).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    x = _torch(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    reference = F.interpolate((x - mean) / std, 224, mode="bicubic").permute(0, 2, 3, 1).numpy()
    ours = np.asarray(preprocess(jnp.asarray(images)))
    assert ours.shape == (2, 224, 224, 3)
    assert np.abs(ours - reference).max() < 1e-5


def test_features_match_repa(tiny, encoder):
    hf, folder = tiny
    images = np.random.default_rng(3).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    ours = np.asarray(encoder.features(images))
    assert ours.shape == (2, 256, 64) and ours.dtype == np.float32
    error = relative_error(ours, _repa_reference(hf, images))
    print(f"REPA features vs torch: relative error {error:.2e}")
    assert error <= 1e-4
    # The two position recipes differ: the test above would catch transformers' in place of timm's.
    timm_table = np.asarray(encoder.model.positions[...])
    transformers_table = np.asarray(load_model(folder, image_size=224).positions[...])
    assert relative_error(transformers_table, timm_table) > 1e-2


def test_features_are_jittable_and_batched(encoder):
    images = np.random.default_rng(4).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    batched = jax.jit(lambda state, x: dinov2_features(nnx.merge(encoder.graphdef, state), x))(encoder.state, images)
    one = encoder.features(images[1:2])
    np.testing.assert_allclose(np.asarray(batched[1:2]), np.asarray(one), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Projector and loss


def test_repa_loss_matches_numpy():
    rng = np.random.default_rng(5)
    projected, targets = rng.normal(size=(3, 7, 16)), rng.normal(size=(3, 7, 16))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    expected = np.mean(np.mean(-(unit(projected) * unit(targets)).sum(-1), axis=1))
    loss = repa_loss(jnp.asarray(projected, jnp.float32), jnp.asarray(targets, jnp.float32))
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(repa_loss(jnp.asarray(targets), 3.0 * jnp.asarray(targets))), -1.0, rtol=1e-6)
    grad = jax.grad(repa_loss)(jnp.zeros((1, 2, 4)), jnp.ones((1, 2, 4)))  # a zero token: no NaN
    assert bool(jnp.isfinite(grad).all())


def test_projector_shapes_and_init():
    projector = RepaProjector(32, z_dim=24, projector_dim=48, rngs=nnx.Rngs(0))
    assert projector(jnp.ones((2, 5, 32))).shape == (2, 5, 24)
    assert all(float(jnp.abs(layer.bias[...]).max()) == 0 for layer in (projector.fc1, projector.fc2, projector.fc3))
    # REPA's widths for DiT-S (hidden 384) against DINOv2-B (768): 384 -> 2048 -> 2048 -> 768.
    full = nnx.eval_shape(lambda: RepaProjector(384, rngs=nnx.Rngs(0)))
    params = sum(v.size for _, v in nnx.to_flat_state(nnx.state(full, nnx.Param)))
    assert params == 384 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 768 + 768


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_missing_file_is_a_clear_error(tmp_path):
    for path in (tmp_path / "nothing.safetensors", tmp_path):  # no file; a folder without model.safetensors
        with pytest.raises(UserError, match="no DINOv2 weights at .*facebook/dinov2-base"):
            load_dinov2(path)


def test_wrong_layout_is_a_clear_error(tiny, tmp_path):
    _, folder = tiny
    sd = load_file(folder / "model.safetensors")
    cases = {
        "not_dinov2": ({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3), np.float32)}, "not a Hugging Face DINOv2"),
        "missing": ({k: v for k, v in sd.items() if k != "layernorm.bias"}, "1 keys are missing, such as layernorm.bias"),
        "registers": ({**sd, "embeddings.register_tokens": np.zeros((1, 4, 64), np.float32)},
                      "unexpected, such as embeddings.register_tokens"),
        "shape": ({**sd, "encoder.layer.1.mlp.fc2.bias": np.zeros((65,), np.float32)},
                  r"encoder.layer.1.mlp.fc2.bias .* has shape \(65,\), expected \(64,\)"),
    }
    for name, (weights, message) in cases.items():
        save_file(weights, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(UserError, match=message):
            load_dinov2(tmp_path / f"{name}.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not read .* as a .safetensors file"):
        load_dinov2(tmp_path / "garbage.safetensors")


def test_wrong_images_are_a_clear_error(encoder):
    for images in (np.zeros((1, 224, 224, 3), np.uint8), np.zeros((1, 256, 256, 3), np.float32)):
        with pytest.raises(UserError, match=r"uint8 RGB images shaped \(B, 256, 256, 3\)"):
            encoder.features(images)


# ---------------------------------------------------------------------------------------------------------
# Full size, from shapes alone


def test_full_size_shapes_and_parameter_count():
    cfg = Dinov2Config(position_resample="timm")
    with torch.device("meta"):  # transformers' own count, no memory: facebook/dinov2-base's config.json
        reference = transformers.Dinov2Model(transformers.Dinov2Config(image_size=518))
    assert count_params(cfg) == sum(p.numel() for p in reference.parameters()) == 86_580_480
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Dinov2(cfg, rngs=nnx.Rngs(0))))
    out = jax.eval_shape(lambda s, x: dinov2_features(nnx.merge(graphdef, s), x), state,
                         jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.uint8))
    assert (out.shape, out.dtype) == ((2, 256, 768), jnp.float32)
