"""Parity of our FID Inception with pytorch-fid's on random weights, the real key layout, and load errors.

Relative error here is max|ours - reference| / max|reference|. The reference is pytorch-fid's own
InceptionV3 (resize_input, normalize_input, use_fid_inception) built with our random weights in place of
the downloaded file, fed as pytorch-fid's calculate_activation_statistics feeds it (float [0, 1] NCHW).
"""

import hashlib
import sys
import urllib.error
from pathlib import Path

import jax
import numpy as np
import pytest

from dit.errors import UserError
from dit.eval import convert_inception, inception
from dit.eval.inception import (FID_WEIGHTS_NAME, FID_WEIGHTS_URL, SHA256_PREFIX, inception_from_state_dict,
                                load_inception, preprocess, torch_key_shapes)

# A copy of the official key layout (shared/reference/pt-inception-2015-12-05.keys.tsv), kept beside the tests so a
# clone runs them anywhere.
REFERENCE_KEYS = Path(__file__).resolve().parent / "reference" / "pt-inception-2015-12-05.keys.tsv"
# Upsampled, exact, and downsampled (the case where an antialiasing resize would differ).
SIZES = [(64, 64), (299, 299), (512, 300), (320, 320)]


def relative_error(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def random_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def torch_input(images):
    """As pytorch-fid's dataset gives them: ToTensor's float [0, 1], NCHW."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def reference_keys() -> dict[str, tuple]:
    keys = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            keys[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return keys


def zero_state_dict() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in torch_key_shapes().items()}


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """pytorch-fid's networks with random weights, and those weights saved in the layout of the real .pth."""
    torch = pytest.importorskip("torch")
    pfi = pytest.importorskip("pytorch_fid.inception")
    torch.manual_seed(0)
    # fid_inception_v3() without its download: the same construction, so its state dict has the file's layout.
    model = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    model.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    model.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    model.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    model.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    model.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    model.Mixed_7b = pfi.FIDInceptionE_1(1280)
    model.Mixed_7c = pfi.FIDInceptionE_2(2048)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):  # He init keeps activations in range through 20-odd layers
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features**-0.5)
                m.bias.normal_(0, 0.1)
        for bn in batchnorms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.momentum = None  # running statistics = the calibration batch's
            bn.reset_running_stats()
        model.train()
        model(torch.rand(2, 3, 299, 299) * 2 - 1)
        model.eval()
        # Then move them off the batch's, so wrong use of mean or variance changes the output.
        for bn in batchnorms:
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.3))
    state_dict = model.state_dict()
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(state_dict, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
        pool3 = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
        full = pfi.fid_inception_v3().eval()  # for its fc
    return pool3, full, path


@pytest.fixture(scope="module")
def ours(torch_reference):
    return load_inception(torch_reference[2])


def test_key_layout_is_the_real_files():
    keys = reference_keys()
    assert len(keys) == 566
    weights = {k: s for k, s in keys.items() if not k.endswith("num_batches_tracked")}
    assert torch_key_shapes() == weights  # no missing, no extra, same torch shapes
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            assert shape == () and key.replace("num_batches_tracked", "running_mean") in weights


def test_the_files_keys_load():
    tsv = {k: np.zeros(s, np.float32) for k, s in reference_keys().items()}
    inception_from_state_dict(tsv)  # num_batches_tracked is ignored, every other key used


@pytest.mark.parametrize("size", SIZES + [(37, 1000)])
def test_resize_matches_torch_bilinear(size):
    torch = pytest.importorskip("torch")
    images = random_images(2, *size)
    ours = np.asarray(preprocess(images))
    x = torch.nn.functional.interpolate(torch_input(images), size=(299, 299), mode="bilinear", align_corners=False)
    reference = (2 * x - 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == (2, 299, 299, 3)
    assert np.abs(ours - reference).max() <= 2e-6
    if size[0] > 299:
        # jax.image.resize antialiases when it shrinks: that would not be pytorch-fid's input.
        smoothed = jax.image.resize(images.astype(np.float32) / 255, (2, 299, 299, 3), "bilinear") * 2 - 1
        assert np.abs(np.asarray(smoothed) - reference).max() > 0.05


@pytest.mark.parametrize("size", SIZES)
def test_features_and_logits_match_pytorch_fid(torch_reference, ours, size):
    torch = pytest.importorskip("torch")
    pool3, full, _ = torch_reference
    images = random_images(2, *size, seed=size[0])
    with torch.no_grad():
        reference = pool3(torch_input(images))[0][:, :, 0, 0]
        reference_logits = full.fc(reference).numpy()
    features, logits = ours.features_and_logits(images)
    assert features.shape == (2, 2048) and features.dtype == np.float32
    assert logits.shape == (2, 1008) and logits.dtype == np.float32
    # The test can fail: the two images' features differ by far more than the tolerance.
    assert relative_error(reference[0], reference[1].numpy()) > 0.05
    assert relative_error(features, reference.numpy()) <= 1e-4
    assert relative_error(logits, reference_logits) <= 1e-4


def test_batching_does_not_change_features(ours):
    images = random_images(5, 80, 90, seed=1)
    whole, logits = ours.features_and_logits(images)
    in_pieces = ours.features(images, batch_size=4, progress=True)
    np.testing.assert_allclose(in_pieces, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    np.testing.assert_array_equal(ours.logits(images), logits)
    assert ours.features(images[:0]).shape == (0, 2048)


def test_converted_file_gives_identical_features(torch_reference, ours, tmp_path):
    pth = torch_reference[2]
    out = tmp_path / "converted.safetensors"
    assert convert_inception.main(["--pth", str(pth), "--out", str(out)]) == 0
    converted = load_inception(out)
    assert converted.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert ours.sha256 == hashlib.sha256(pth.read_bytes()).hexdigest()
    images = random_images(2, 64, 64)
    for a, b in zip(converted.features_and_logits(images), ours.features_and_logits(images)):
        np.testing.assert_array_equal(a, b)


def test_convert_rejects_bad_input(tmp_path, capsys):
    assert convert_inception.main(["--pth", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no file at" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    pytest.importorskip("torch")
    assert convert_inception.main(["--pth", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "torch.load" in capsys.readouterr().err


def test_missing_file_names_the_weights_and_their_url(tmp_path):
    with pytest.raises(UserError) as error:
        load_inception(tmp_path / "pt_inception.pth")
    assert FID_WEIGHTS_NAME in str(error.value) and FID_WEIGHTS_URL in str(error.value)


def test_missing_and_unexpected_keys_are_listed():
    sd = zero_state_dict()
    del sd["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    sd["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    with pytest.raises(UserError) as error:
        inception_from_state_dict(sd)
    assert "Mixed_6c.branch7x7dbl_3.bn.running_var" in str(error.value)
    assert "AuxLogits.fc.weight" in str(error.value)


def test_wrong_shape_is_an_error():
    sd = zero_state_dict()
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(UserError, match="fc.weight"):
        inception_from_state_dict(sd)


def test_download_with_wrong_sha_is_an_error(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(url, dest):
        fetched.append(url)
        Path(dest).write_bytes(b"not the weights")

    monkeypatch.setattr(inception, "_fetch", fake_fetch)
    with pytest.raises(UserError, match=SHA256_PREFIX):
        load_inception(None, cache_dir=tmp_path)
    assert fetched == [FID_WEIGHTS_URL]
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded is left to be trusted later


def test_offline_download_says_where_to_get_the_weights(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception, "_fetch", offline)
    with pytest.raises(UserError) as error:
        load_inception("pt_inception", cache_dir=tmp_path)
    assert FID_WEIGHTS_NAME in str(error.value) and FID_WEIGHTS_URL in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_cached_file_with_wrong_sha_is_an_error(tmp_path):
    (tmp_path / FID_WEIGHTS_NAME).write_bytes(b"damaged")
    with pytest.raises(UserError, match="Delete it"):
        load_inception(None, cache_dir=tmp_path)


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
    pth = tmp_path / FID_WEIGHTS_NAME
    pth.write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(UserError) as error:
        load_inception(pth)
    assert "python -m dit.eval.convert_inception --pth" in str(error.value)
    assert "pip install torch" in str(error.value)


def test_images_must_be_uint8_rgb():
    net = inception_from_state_dict(zero_state_dict())
    with pytest.raises(UserError, match="uint8"):
        net.features(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        net.features(np.zeros((1, 64, 64), np.uint8))


def test_bfloat16_is_close(torch_reference, ours):
    images = random_images(2, 64, 64, seed=2)
    fast = load_inception(torch_reference[2], dtype="bfloat16")
    assert fast.dtype == "bfloat16"
    assert relative_error(fast.features(images), ours.features(images)) <= 0.05
