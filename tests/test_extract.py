"""Latent extraction into the cache: bad files, flips, resume after a kill, multi-process shards, errors."""

import json

import jax

import numpy as np
import pytest

from dit.autoencoder import PixelAutoencoder
from dit.data import cache as latent_cache
from dit.data.cache import LatentCache
from dit.data.extract import extract, main
from dit.data.images import find_images, load_image
from dit.errors import UserError
from tests.fake_imagenet import make_fake_imagenet

RES = 16


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("in100")
    return root, make_fake_imagenet(root)


def run(root, out, **kw):
    return extract(root, PixelAutoencoder(), out, resolution=RES, batch_size=4, shard_size=5, dtype="float32",
                   progress=False, **kw)


def test_extraction_skips_exactly_the_bad_files_and_holds_every_good_image_twice(fake, tmp_path):
    root, info = fake
    manifest = run(root, tmp_path / "cache")
    assert {s["path"]: s["reason"] for s in manifest["skipped"]}.keys() == {str(p) for p in info["bad"]}
    for item in manifest["skipped"]:
        assert item["reason"].startswith(info["bad"][next(p for p in info["bad"] if str(p) == item["path"])])
    good = info["train"] - len(info["bad"])
    assert manifest["count"] == good and manifest["classes"] == info["classes"]
    assert manifest["scale_factor"] == 1.0 and manifest["latent_shape"] == [RES, RES, 3]

    cache = LatentCache(tmp_path / "cache")
    image_set = find_images(root)
    indices = np.concatenate([np.load(tmp_path / "cache" / s["name"] / "index.npy") for s in manifest["shards"]])
    assert len(cache) == len(indices) == good
    for i, file_index in enumerate(indices):  # each record: the image and its mirror, exactly (pixels)
        path, label = image_set.files[file_index]
        expected = load_image(path, RES).astype(np.float32) / 127.5 - 1.0
        mean, std, cached_label = cache.record(i)
        np.testing.assert_allclose(mean[0], expected, atol=1e-6)
        np.testing.assert_allclose(mean[1], expected[:, ::-1], atol=1e-6)
        assert cached_label == label and np.all(std == 0)
    every = np.concatenate([np.load(tmp_path / "cache" / s["name"] / "mean.npy") for s in manifest["shards"]])
    np.testing.assert_allclose(manifest["latent_channel_mean"], every.mean(axis=(0, 1, 2, 3)), atol=1e-6)


def test_a_killed_extraction_resumes_to_the_same_cache(fake, tmp_path, monkeypatch):
    root, _ = fake
    run(root, tmp_path / "straight")

    real_write = latent_cache.write_shard
    written = []

    def dies_on_the_third_shard(directory, k, shard):
        if len(written) == 2:
            (directory / f".tmp-{latent_cache.shard_name(k)}-deadbeef").mkdir()  # half-written, as a kill leaves
            raise KeyboardInterrupt
        written.append(k)
        real_write(directory, k, shard)

    monkeypatch.setattr(latent_cache, "write_shard", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run(root, tmp_path / "killed")
    monkeypatch.setattr(latent_cache, "write_shard", real_write)
    assert not (tmp_path / "killed" / latent_cache.MANIFEST).exists()
    with pytest.raises(UserError, match="unfinished"):
        LatentCache(tmp_path / "killed")

    resumed = run(root, tmp_path / "killed")
    assert not list((tmp_path / "killed").glob(".tmp-*"))
    straight = json.loads((tmp_path / "straight" / latent_cache.MANIFEST).read_text())
    for key in ("count", "shards", "skipped", "latent_channel_mean", "classes"):
        assert resumed[key] == straight[key]
    for shard in straight["shards"]:
        for name in ("mean", "std", "label", "index"):
            a = np.load(tmp_path / "straight" / shard["name"] / f"{name}.npy")
            b = np.load(tmp_path / "killed" / shard["name"] / f"{name}.npy")
            np.testing.assert_array_equal(a, b)


def test_two_processes_write_their_own_shards_and_the_last_writes_the_manifest(fake, tmp_path, monkeypatch):
    root, _ = fake
    import jax
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert run(root, tmp_path / "cache") is None  # process 1 alone: process 0's shards are missing
    odd = latent_cache.finished_shards(tmp_path / "cache")
    assert odd and all(k % 2 == 1 for k in odd)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    manifest = run(root, tmp_path / "cache")
    assert manifest is not None and len(manifest["shards"]) == len(odd | latent_cache.finished_shards(tmp_path / "cache"))
    monkeypatch.undo()
    single = run(root, tmp_path / "single")
    assert manifest["count"] == single["count"] and manifest["latent_channel_mean"] == single["latent_channel_mean"]


def test_other_settings_on_an_existing_cache_are_refused(fake, tmp_path):
    root, _ = fake
    run(root, tmp_path / "cache")
    with pytest.raises(UserError, match="other settings.*resolution"):
        extract(root, PixelAutoencoder(), tmp_path / "cache", resolution=8, batch_size=4, shard_size=5,
                dtype="float32", progress=False)


def test_the_command_line_reports_a_wrong_root_and_exits_non_zero(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing"), "--vae", "pixels", "--out", str(tmp_path / "c")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_the_command_line_builds_a_cache(fake, tmp_path, capsys):
    root, info = fake
    assert main(["--data", str(root), "--vae", "pixels", "--out", str(tmp_path / "c"), "--resolution", "8",
                 "--shard-size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"found {info['train']} train images" in out and "skipped 2 files" in out
    assert LatentCache(tmp_path / "c").latent_shape == (8, 8, 3)


def tiny_vae():
    """A randomly initialised SD-VAE architecture, small: 16px images -> 8x8x4 latents."""
    from flax import nnx

    from dit.vae import VAE, AutoencoderKL, VAEConfig
    cfg = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    graphdef, params = nnx.split(AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    return VAE(cfg, graphdef, params, source="tiny-test-vae", sha256="0" * 64)


def test_vae_latents_in_the_cache_equal_the_vae_encoding_and_sampling_decodes_them(fake, tmp_path):
    from dit.config import EvalConfig, ModelConfig, TrainConfig
    from dit.model import DiT
    from dit.sample import generate
    from dit.vae import SCALE_FACTOR
    from flax import nnx

    root, _ = fake
    vae = tiny_vae()
    manifest = extract(root, vae, tmp_path / "cache", resolution=RES, batch_size=8, shard_size=64,
                       dtype="float32", progress=False)
    assert manifest["latent_shape"] == [8, 8, 4] and manifest["scale_factor"] == SCALE_FACTOR
    assert manifest["autoencoder"] == {"source": "tiny-test-vae", "sha256": "0" * 64}
    cache = LatentCache(tmp_path / "cache")
    image_set = find_images(root)
    index = np.load(tmp_path / "cache" / "shard-00000" / "index.npy")
    images = np.stack([load_image(image_set.files[i][0], RES) for i in index[:4]]).astype(np.float32) / 127.5 - 1
    mean, logvar = vae.encode(np.concatenate([images, images[:, :, ::-1]]))
    for i in range(4):
        cached_mean, cached_std, _ = cache.record(i)
        np.testing.assert_allclose(cached_mean[0], mean[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cached_mean[1], mean[4 + i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cached_std[1], np.exp(0.5 * logvar[4 + i]), rtol=1e-5, atol=1e-6)

    model_cfg = ModelConfig(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                            num_classes=cache.num_classes)
    graphdef, params = nnx.split(DiT(model_cfg, rngs=nnx.Rngs(0)))
    samples = generate(graphdef, params, model_cfg, TrainConfig(), EvalConfig(sampling_steps=2, batch_size=8),
                       seed=0, num_samples=8, decoder=vae, progress=False)
    assert samples.shape == (8, RES, RES, 3) and samples.dtype == np.uint8


def test_a_folder_of_only_bad_files_is_refused_and_no_cache_is_marked_complete(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "bad" / name).mkdir(parents=True)
        (tmp_path / "bad" / name / "1.jpg").write_text("not a JPEG")
    assert main(["--data", str(tmp_path / "bad"), "--vae", "pixels", "--out", str(tmp_path / "c"),
                 "--resolution", "8"]) == 2
    err = capsys.readouterr().err
    error = err[err.index("error:"):]  # after the progress bar
    assert error.startswith("error: none of the 2 image files could be read (2 not an image")
    assert "no cache was made" in error and "Traceback" not in err and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "c" / latent_cache.MANIFEST).exists()
    with pytest.raises(UserError, match="unfinished"):
        LatentCache(tmp_path / "c")


@pytest.mark.parametrize("flag,value", [("--shard-size", "-5"), ("--shard-size", "0"), ("--resolution", "0"),
                                        ("--batch", "0")])
def test_sizes_below_one_are_refused_before_anything_is_written(fake, tmp_path, capsys, flag, value):
    root, _ = fake
    assert main(["--data", str(root), "--vae", "pixels", "--out", str(tmp_path / "c"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {value}: sizes must be positive") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_an_out_that_is_a_file_is_refused(fake, tmp_path, capsys):
    root, _ = fake
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["--data", str(root), "--vae", "pixels", "--out", str(out), "--resolution", "8"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and str(out) in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_full_disk_is_a_clear_error_and_the_rerun_resumes_to_the_same_cache(fake, tmp_path, monkeypatch):
    import errno
    root, _ = fake
    straight = run(root, tmp_path / "straight")
    real_save = latent_cache._save_npy
    calls = []

    def disk_fills_in_the_third_shard(path, array):
        calls.append(path)
        if len(calls) == 9:  # shards hold 4 arrays: the first of shard 2
            path.write_bytes(b"\x93NUMPY half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(latent_cache, "_save_npy", disk_fills_in_the_third_shard)
    with pytest.raises(UserError, match=r"^the disk is full: writing the latent cache in .*full failed \(No space "
                                        r"left on device\)\. 2 of its 4 shards are finished.*run the same command"):
        run(root, tmp_path / "full")
    assert not list((tmp_path / "full").glob(".tmp-*")) and not (tmp_path / "full" / latent_cache.MANIFEST).exists()
    assert latent_cache.finished_shards(tmp_path / "full") == {0, 1}
    monkeypatch.setattr(latent_cache, "_save_npy", real_save)
    resumed = run(root, tmp_path / "full")
    for key in ("count", "shards", "skipped", "latent_channel_mean"):
        assert resumed[key] == straight[key]


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_cache_arrays_report_a_full_disk_as_enospc():
    # numpy's own writer says "N requested and M written" with no errno, which no caller can recognise.
    import errno
    from pathlib import Path
    with pytest.raises(OSError) as caught:
        latent_cache._save_npy(Path("/dev/full"), np.zeros((64, 2, 8, 8, 4), np.float32))
    assert caught.value.errno == errno.ENOSPC


def test_the_reader_refuses_an_empty_or_incomplete_cache(fake, tmp_path):
    root, _ = fake
    run(root, tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / latent_cache.MANIFEST).read_text())
    (tmp_path / "cache" / "shard-00001" / "mean.npy").unlink()
    with pytest.raises(UserError, match=r"incomplete: 1 of the files its manifest lists are missing "
                                        r"\(shard-00001/mean.npy\)"):
        LatentCache(tmp_path / "cache")
    # What an older extract wrote for a folder of bad files: a manifest of nothing.
    latent_cache.write_json_atomic(tmp_path / "cache" / latent_cache.MANIFEST,
                                   {**manifest, "count": 0, "shards": [], "skipped": manifest["skipped"]})
    with pytest.raises(UserError, match="holds no images .2 source files were skipped"):
        LatentCache(tmp_path / "cache")


class FakeRepaEncoder:
    """Stands in for `dit.repa.load_dinov2` (its parity is tests/test_repa.py's): 4 tokens of 6 features that
    depend on each image, in the encoder's interface."""

    source, sha256, resolution, feature_shape = "fake-dinov2", "0" * 64, RES, (4, 6)

    def features(self, images):
        x = np.asarray(images, np.float32).reshape(len(images), 4, -1)
        return np.stack([x.mean(-1), x.std(-1), x[..., 0], x[..., 1], -x.mean(-1), x.max(-1)], axis=-1)


def test_repa_targets_are_the_encoders_features_of_the_unflipped_image_as_int8_directions(fake, tmp_path):
    from dit.repa import int8_directions
    root, _ = fake
    run(root, tmp_path / "cache", repa_encoder=FakeRepaEncoder())
    cache = LatentCache(tmp_path / "cache")
    assert cache.has_repa and cache.repa_shape == (4, 6)
    records = np.array([3, 0, len(cache) - 1])
    targets = cache.read_repa(records)
    mean, _, _ = cache.read(records, flips=1)
    images = np.round((mean[:, 0] + 1) * 127.5).astype(np.uint8)  # the pixel autoencoder's latents are the images
    np.testing.assert_array_equal(targets, int8_directions(FakeRepaEncoder().features(images)))
    cosine = np.sum(targets * FakeRepaEncoder().features(images), -1) / (
        np.linalg.norm(targets, axis=-1) * np.linalg.norm(FakeRepaEncoder().features(images), axis=-1))
    assert cosine.min() > 0.999  # the stored directions are the features'
    run(root, tmp_path / "plain")  # no encoder: no targets
    with pytest.raises(UserError, match="holds no REPA targets"):
        LatentCache(tmp_path / "plain").read_repa(records)
