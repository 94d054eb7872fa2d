"""The training data a config names: a latent cache or images on the fly, checked against the model."""

import pytest

from dit.config import DataConfig, ModelConfig, TrainConfig
from dit.data.pipeline import CacheBatches, ImageBatches
from dit.data.source import training_data
from dit.errors import UserError
from tests.fake_imagenet import make_class_folders, make_fake_imagenet


def test_images_on_the_fly_are_named_and_shaped_like_a_cache_of_them(tmp_path):
    make_fake_imagenet(tmp_path / "in100", bad=False)
    data = DataConfig(images=str(tmp_path / "in100"), vae="pixels", resolution=8, cache="ignored/when/images/set")
    found = training_data(data)
    assert found.cache is None and found.dataset == "imagenet100" and found.resolution == 8
    assert found.latent_shape == (8, 8, 3) and found.num_classes == 5
    found.check_model(ModelConfig(input_size=8, in_channels=3, num_classes=5), "here")
    with pytest.raises(UserError, match="--set model.input_size=8 --set model.in_channels=3 --set model.num_classes=5"):
        found.check_model(ModelConfig(), "here")
    source = found.batches(data, TrainConfig(batch_size=8))
    assert isinstance(source, ImageBatches)
    batch = source.next()
    assert batch.mean.shape == (8, 1, 8, 8, 3) and batch.label.shape == (8,)


def test_a_cache_and_the_errors_that_name_the_fix(tmp_path):
    from dit.autoencoder import PixelAutoencoder
    from dit.data.extract import extract
    make_class_folders(tmp_path / "digits", classes=2, per_class=4, size=(8, 8))
    extract(tmp_path / "digits", PixelAutoencoder(), tmp_path / "cache", resolution=8, batch_size=8, shard_size=8,
            dtype="float32", progress=False)
    found = training_data(DataConfig(cache=str(tmp_path / "cache")))
    assert found.cache is not None and found.dataset == "digits" and found.latent_shape == (8, 8, 3)
    assert isinstance(found.batches(DataConfig(cache=str(tmp_path / "cache")), TrainConfig(batch_size=4)),
                      CacheBatches)
    with pytest.raises(UserError, match="python -m dit.data.extract"):
        training_data(DataConfig())
    with pytest.raises(UserError, match="does not exist"):
        training_data(DataConfig(images=str(tmp_path / "nowhere"), vae="pixels"))


def test_the_data_brings_the_autoencoder_that_made_it(tmp_path):
    import json

    import jax.numpy as jnp

    from dit.autoencoder import PixelAutoencoder, decode_scaled
    from dit.data import cache as latent_cache
    from dit.data.extract import extract
    make_class_folders(tmp_path / "digits", classes=2, per_class=4, size=(8, 8))
    extract(tmp_path / "digits", PixelAutoencoder(), tmp_path / "cache", resolution=8, batch_size=8, shard_size=8,
            dtype="float32", progress=False)
    found = training_data(DataConfig(cache=str(tmp_path / "cache")))
    assert found.autoencoder == PixelAutoencoder(1.0) and found.autoencoder is found.autoencoder  # loaded once
    # A cache records the scale factor its latents were multiplied by; sampling divides by that one.
    path = tmp_path / "cache" / latent_cache.MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "scale_factor": 2.0}))
    scaled = training_data(DataConfig(cache=str(tmp_path / "cache"))).autoencoder
    assert scaled.scale_factor == 2.0 and scaled.source == "pixels"
    assert float(decode_scaled(scaled, scaled.weights, jnp.full((1, 8, 8, 3), 1.0))[0, 0, 0, 0]) == 0.5
    # On the fly, the data.vae that encodes the batches: its channels and downsampling shape the latents.
    make_class_folders(tmp_path / "images", classes=2, per_class=4, size=(8, 8))
    on_the_fly = training_data(DataConfig(images=str(tmp_path / "images"), vae="pixels", resolution=8))
    assert on_the_fly.autoencoder == PixelAutoencoder(1.0) and on_the_fly.latent_shape == (8, 8, 3)
