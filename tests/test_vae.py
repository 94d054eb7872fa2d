"""Parity of our AutoencoderKL with diffusers' on a small random VAE, the real key layout, and load errors.

Relative error here is max|ours - reference| / max|reference|.
"""

import hashlib
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dit.errors import UserError
from dit.vae import SCALE_FACTOR, convert_state_dict, infer_config, load_vae, param_shapes

# A copy of the official key layout (shared/reference/sd-vae-ft-ema.diffusers.keys.tsv), kept beside the tests so a
# clone runs them anywhere.
REFERENCE_KEYS = Path(__file__).resolve().parent / "reference" / "sd-vae-ft-ema.diffusers.keys.tsv"
GROUPS = 8


def relative_error(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def nhwc(x):
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def reference():
    """A small diffusers AutoencoderKL with every parameter randomised (the zero-initialised ones too)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2, norm_num_groups=GROUPS, latent_channels=4,
        sample_size=32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def state_dict(reference):
    return {k: v.numpy() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def vae_file(reference, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vae") / "diffusion_pytorch_model.safetensors"
    save_file(reference.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(reference, images):
    import torch

    with torch.no_grad():
        dist = reference.encode(torch.from_numpy(nchw(images))).latent_dist
        decoded = reference.decode(dist.mean).sample
    return nhwc(dist.mean), nhwc(dist.logvar), nhwc(decoded)


def to_old_attention_names(sd: dict) -> dict:
    """diffusers' names before 0.14; the encoder's projections as 1x1 conv weights, as some old files hold."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in sd.items():
        for new, was in names.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{was}.")
                if key.startswith("encoder.") and value.ndim == 2:
                    value = value[:, :, None, None]
        old[key] = value
    return old


def test_matches_diffusers(vae_file, images, expected):
    vae = load_vae(vae_file, norm_num_groups=GROUPS)
    mean, logvar, decoded = expected
    ours_mean, ours_logvar = vae.encode(images)
    assert ours_mean.shape == (2, 16, 16, 4) and ours_logvar.shape == (2, 16, 16, 4)
    assert relative_error(ours_mean, mean) <= 1e-4
    assert relative_error(ours_logvar, logvar) <= 1e-4
    ours_decoded = vae.decode(mean)
    assert ours_decoded.shape == (2, 32, 32, 3) and ours_decoded.dtype == np.float32
    assert relative_error(ours_decoded, decoded) <= 1e-4


def test_old_attention_names_load(vae_file, state_dict, images, expected, tmp_path):
    from safetensors.numpy import save_file

    old = to_old_attention_names(state_dict)
    assert old["encoder.mid_block.attentions.0.query.weight"].ndim == 4
    assert old["decoder.mid_block.attentions.0.proj_attn.weight"].ndim == 2
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    vae = load_vae(path, norm_num_groups=GROUPS)
    mean, logvar, decoded = expected
    ours_mean, ours_logvar = vae.encode(images)
    assert relative_error(ours_mean, mean) <= 1e-4
    assert relative_error(ours_logvar, logvar) <= 1e-4
    assert relative_error(vae.decode(mean), decoded) <= 1e-4


def test_identity_and_jit_after_split(vae_file, state_dict, images):
    vae = load_vae(str(vae_file), norm_num_groups=GROUPS)
    assert vae.source == str(vae_file)
    assert vae.sha256 == hashlib.sha256(vae_file.read_bytes()).hexdigest()
    assert load_vae(vae_file.parent, norm_num_groups=GROUPS).sha256 == vae.sha256  # a diffusers folder
    from_dict = load_vae(state_dict, norm_num_groups=GROUPS)
    assert from_dict.sha256 is None and from_dict.source is None
    # The documented pattern for a caller's own jit: parameters as an argument, merged inside.
    encode = jax.jit(lambda params, x: nnx.merge(vae.graphdef, params).encode(x))
    mean, _ = encode(vae.params, images)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(from_dict.encode(images)[0]), rtol=0, atol=1e-5)


def test_logvar_is_clipped(state_dict, images):
    for bias, bound in [(1e4, 20.0), (-1e4, -30.0)]:
        sd = dict(state_dict, **{"quant_conv.bias": np.concatenate([np.zeros(4), np.full(4, bias)]).astype(np.float32)})
        _, logvar = load_vae(sd, norm_num_groups=GROUPS).encode(images)
        assert np.all(np.asarray(logvar) == bound)


def test_bfloat16_compute_is_close(state_dict, images, expected):
    vae = load_vae(state_dict, norm_num_groups=GROUPS, dtype="bfloat16")
    mean, _, decoded = expected
    assert vae.params["encoder"]["conv_in"]["kernel"].dtype == np.float32
    assert relative_error(vae.encode(images)[0], mean) <= 5e-2
    assert relative_error(vae.decode(mean), decoded) <= 5e-2


def read_reference_shapes() -> tuple[dict, int]:
    shapes, total = {}, None
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line.startswith("# ") and "parameters" in line:
            total = int(line.split(",")[1].split()[0])
        elif line and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes, total


def test_real_layout_is_covered():
    shapes, total = read_reference_shapes()
    cfg = infer_config(shapes)
    assert (cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels) == ((128, 256, 512, 512), 2, 4)
    # Zero-stride arrays carry the shapes through the real conversion without allocating the weights.
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    converted = {path: array.shape for path, array in convert_state_dict(sd, cfg).items()}
    ours = param_shapes(cfg)  # jax.eval_shape underneath
    assert converted == ours
    assert len(ours) == len(shapes) == 248
    assert sum(int(np.prod(s)) for s in ours.values()) == total == 83_653_863


def test_scale_factor():
    assert SCALE_FACTOR == 0.18215


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "vae.safetensors"
    with pytest.raises(UserError, match="no VAE weights file at .*nope/vae.safetensors"):
        load_vae(missing)
    with pytest.raises(UserError, match="no VAE weights file at weights/sd-vae"):
        load_vae("weights/sd-vae/model.bin/extra")


def test_file_missing_keys_fails(state_dict, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state_dict.items() if not k.startswith("encoder.conv_in")}, str(path))
    with pytest.raises(UserError, match="not a diffusers AutoencoderKL: keys encoder.conv_in.weight"):
        load_vae(path, norm_num_groups=GROUPS)
    partial = {k: v for k, v in state_dict.items() if "decoder.up_blocks.1.resnets.2" not in k}
    with pytest.raises(UserError, match="lack 8 of our parameters, such as decoder.up_blocks.1.resnets.2"):
        load_vae(partial, norm_num_groups=GROUPS)


def test_unknown_keys_and_bad_groups_fail(state_dict):
    with pytest.raises(UserError, match="not part of a diffusers AutoencoderKL, such as encoder.extra.weight"):
        load_vae({**state_dict, "encoder.extra.weight": np.zeros((2, 2), np.float32)}, norm_num_groups=GROUPS)
    with pytest.raises(UserError, match="norm_num_groups=24 does not divide"):
        load_vae(state_dict, norm_num_groups=24)
    with pytest.raises(UserError, match="dtype 'float16'"):
        load_vae(state_dict, norm_num_groups=GROUPS, dtype="float16")


def test_offline_repo_id_names_the_url(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    url = "https://huggingface.co/stabilityai/sd-vae-ft-ema/resolve/main/diffusion_pytorch_model.safetensors"
    with pytest.raises(UserError, match=url.replace(".", r"\.")):
        load_vae("stabilityai/sd-vae-ft-ema")


def test_repo_id_without_huggingface_hub_names_the_url(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(UserError, match=r"huggingface_hub.*https://huggingface\.co/stabilityai/sd-vae-ft-mse/"):
        load_vae("stabilityai/sd-vae-ft-mse")


def test_repo_id_downloads_the_diffusers_file(monkeypatch, vae_file):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(vae_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    vae = load_vae("stabilityai/sd-vae-ft-ema", norm_num_groups=GROUPS)
    assert asked == [("stabilityai/sd-vae-ft-ema", "diffusion_pytorch_model.safetensors")]
    assert vae.source == "stabilityai/sd-vae-ft-ema"
    assert vae.sha256 == hashlib.sha256(vae_file.read_bytes()).hexdigest()
