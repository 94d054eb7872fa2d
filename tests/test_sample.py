"""Sampling: determinism, class balance, the objective's samplers, guidance, and the written files."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dit.autoencoder import PixelAutoencoder
from dit.config import EvalConfig, TrainConfig
from dit.diffusion import create_diffusion
from dit.mesh import batch_sharded, data_mesh
from dit.sample import (DECODE_ROWS_PER_DEVICE, Samples, balanced_labels, decode_in_chunks, generate, generate_shares,
                        make_sampler, save_grid, save_npz, to_uint8)
from tests.helpers import TINY, randomized

EVAL = EvalConfig(num_samples=12, sampling_steps=5, batch_size=8)


class Shrink(PixelAutoencoder):
    """A decoder that scales a random model's wild samples into [-1, 1], so uint8 images still differ."""

    def decode_with(self, weights, latents):
        return latents / jnp.max(jnp.abs(latents), axis=(1, 2, 3), keepdims=True)


@pytest.fixture(scope="module")
def model():
    graphdef, params = nnx.split(randomized(TINY))
    return graphdef, params


def test_deterministic_for_a_seed_and_different_across_seeds(model):
    a = generate(*model, TINY, TrainConfig(), EVAL, seed=0, decoder=Shrink(), progress=False)
    b = generate(*model, TINY, TrainConfig(), EVAL, seed=0, decoder=Shrink(), progress=False)
    c = generate(*model, TINY, TrainConfig(), EVAL, seed=1, decoder=Shrink(), progress=False)
    assert a.shape == (12, 8, 8, 4) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5


def test_first_batch_equals_the_diffusion_sampler_on_the_conditional_model(model):
    graphdef, params = model
    out = generate(graphdef, params, TINY, TrainConfig(), dataclasses.replace(EVAL, num_samples=8), seed=3,
                   progress=False)
    diffusion = create_diffusion("5")
    key_noise, key_sampler = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0))
    noise = jax.random.normal(key_noise, (8, 8, 8, 4))
    y = jnp.asarray(balanced_labels(8, TINY.num_classes))
    net = nnx.merge(graphdef, params)
    expected = diffusion.p_sample_loop(lambda x, t: net(x, t, y), noise.shape, key_sampler, noise=noise)
    diff = np.abs(out.astype(int) - np.asarray(to_uint8(expected)).astype(int))
    assert diff.max() <= 1  # the same computation sharded over 8 devices: at most a rounding step apart


@pytest.mark.parametrize("sampler", ["ddim", "euler", "sde"])
def test_samplers_guidance_and_its_interval_change_the_samples(model, sampler):
    graphdef, params = model
    net = nnx.merge(graphdef, params)
    train = TrainConfig(objective="ddpm" if sampler == "ddim" else "flow")
    noise = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    y = jnp.arange(8)
    outputs = {}
    for name, scale, low, high in [("plain", 1.0, 0.0, 1.0), ("guided", 4.0, 0.0, 1.0), ("interval", 4.0, 0.2, 0.8)]:
        cfg = dataclasses.replace(EVAL, sampler=sampler, cfg_scale=scale, guidance_low=low, guidance_high=high)
        run = make_sampler(TINY, train, cfg)
        outputs[name] = np.asarray(run(lambda x, t, y: net(x, t, y), noise, jax.random.PRNGKey(0), y))
    assert outputs["plain"].shape == (8, 8, 8, 4)
    for a, b in [("plain", "guided"), ("plain", "interval"), ("guided", "interval")]:
        rel = np.abs(outputs[a] - outputs[b]).max() / np.abs(outputs[a]).max()
        assert rel > 1e-4, (a, b, rel)
    images = generate(graphdef, params, TINY, train, dataclasses.replace(EVAL, sampler=sampler), seed=0,
                      decoder=Shrink(), progress=False)
    assert images.shape == (12, 8, 8, 4)


def test_guidance_scales_share_one_compiled_sampler_and_equal_a_fixed_scale(model):
    import dit.sample
    from dit.guidance import guided_model_fn
    graphdef, params = model
    eval_cfg = dataclasses.replace(EVAL, num_samples=8)
    decoder = Shrink()  # one decoder: the compiled programs are cached per decoder
    dit.sample._batch_sampler.cache_clear()
    images = {scale: generate(graphdef, params, TINY, TrainConfig(), dataclasses.replace(eval_cfg, cfg_scale=scale),
                              seed=3, decoder=decoder, progress=False) for scale in (1.0, 1.5, 4.0)}
    assert dit.sample._batch_sampler.cache_info().misses == 2  # unguided, and every guided scale
    assert np.mean(images[1.5] != images[4.0]) > 0.5
    # The scale as an argument of the program gives what guidance with the scale written in gives.
    diffusion = create_diffusion("5")
    key_noise, key_sampler = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0))
    noise = jax.random.normal(key_noise, (8, 8, 8, 4))
    y = jnp.asarray(balanced_labels(8, TINY.num_classes))
    net = nnx.merge(graphdef, params)
    fn = guided_model_fn(lambda x, t, y: net(x, t, y), 4.0, TINY.num_classes, eval_cfg.guided_channels)
    expected = diffusion.p_sample_loop(lambda x, t: fn(x, t, y), noise.shape, key_sampler, noise=noise)
    expected = decoder.decode(expected)
    diff = np.abs(images[4.0].astype(int) - np.asarray(to_uint8(expected)).astype(int))
    assert diff.max() <= 1  # sharded over 8 devices: at most a rounding step apart


@pytest.mark.parametrize("rows", [8, 40, 128])  # 1, 5 and 16 rows a device: one chunk, 5 of 1, 2 of 8
def test_decoding_in_chunks_equals_decoding_the_batch_and_keeps_rows_in_place(rows):
    mesh = data_mesh()
    latents = jax.device_put(jax.random.normal(jax.random.key(0), (rows, 4, 4, 3)), batch_sharded(mesh))
    seen = []

    def decode(weight, z):  # rows mixed with nothing but themselves, as a decoder's
        seen.append(z.shape[0])
        return jnp.tanh(weight * z + z.mean(axis=(1, 2, 3), keepdims=True))

    images = jax.jit(lambda z: decode_in_chunks(decode, 0.7, z, mesh.devices.size))(latents)
    np.testing.assert_array_equal(images, to_uint8(decode(0.7, latents)))
    assert max(seen[:-1]) <= DECODE_ROWS_PER_DEVICE * mesh.devices.size
    assert images.sharding.is_equivalent_to(batch_sharded(mesh), images.ndim)


def test_balanced_labels():
    counts = np.bincount(balanced_labels(1000, 100), minlength=100)
    assert counts.min() == counts.max() == 10


def test_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    save_npz(images, tmp_path / "samples.npz")
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], images)
    save_grid(images, tmp_path / "grid.png", columns=3)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 8 + 2, 3 * 8 + 2, 3)
    np.testing.assert_array_equal(grid[2:8, 10:16], images[1])


def test_a_share_gathers_in_sample_order_without_the_padding():
    samples = Samples(images=np.zeros((5, 1, 1, 1), np.uint8), index=np.array([3, 0, 7, 1, 2]), total=4)
    rows = np.array([30, 0, 70, 10, 20])  # rows computed from the share, in its order
    np.testing.assert_array_equal(samples.gather(rows), [0, 10, 20, 30])


def test_one_process_share_is_every_sample_in_order(model):
    shares = generate_shares(*model, TINY, TrainConfig(), EVAL, seed=0, decoder=Shrink(), progress=False)
    assert shares.total == 12 and len(shares.images) == 16  # two batches of 8, the last padded
    np.testing.assert_array_equal(shares.index, np.arange(16))
    whole = generate(*model, TINY, TrainConfig(), EVAL, seed=0, decoder=Shrink(), progress=False)
    np.testing.assert_array_equal(shares.images[:12], whole)
