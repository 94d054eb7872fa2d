"""The input pipeline over the latent cache: order, sharding over processes, resume, and the latents the
step draws from each batch."""

import jax
import numpy as np
import pytest

from dit.batches import latents_from_batch
from dit.data import cache as latent_cache
from dit.data.pipeline import CacheBatches, EpochOrder
from dit.errors import UserError

N, SHAPE = 40, (4, 4, 4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A small cache written with the real writer: record i's mean is i (flipped: -i), std 0.5."""
    out = tmp_path_factory.mktemp("cache")
    for k, (start, stop) in enumerate(latent_cache.shard_ranges(N, 16)):
        ids = np.arange(start, stop)
        mean = np.stack([np.broadcast_to(ids[:, None, None, None], (len(ids), *SHAPE)),
                         np.broadcast_to(-ids[:, None, None, None], (len(ids), *SHAPE))], 1).astype(np.float16)
        latent_cache.write_shard(out, k, latent_cache.Shard(
            mean, np.full_like(mean, 0.5), (ids % 5).astype(np.int32), ids.astype(np.int64), []))
    latent_cache.build_manifest(out, {"scale_factor": 2.0}, [str(c) for c in range(5)], {}, SHAPE,
                                len(latent_cache.shard_ranges(N, 16)))
    return out


def batches(cache_dir, n, seed=3, **kwargs):
    source = CacheBatches(cache_dir, 8, seed=seed, **{"process_index": 0, "process_count": 1, **kwargs})
    return [source.next() for _ in range(n)]


def joined(batches):
    """The batches as one, rows in the order they were read."""
    return type(batches[0])(*(None if leaf[0] is None else np.concatenate(leaf) for leaf in zip(*batches)))


draw = jax.jit(latents_from_batch)  # seed and scale traced: one compile per batch shape


def assert_batches_equal(a, b):
    for leaf_a, leaf_b in zip(a, b):
        np.testing.assert_array_equal(leaf_a, leaf_b)


def test_every_record_once_per_epoch_and_a_new_order_each_epoch(cache_dir):
    read = batches(cache_dir, 10)
    epoch0, epoch1 = joined(read[:5]), joined(read[5:])
    assert sorted(epoch0.record) == list(range(N)) and sorted(epoch1.record) == list(range(N))
    assert (epoch0.epoch == 0).all() and (epoch1.epoch == 1).all()
    assert not np.array_equal(epoch0.record, epoch1.record)


def test_each_row_holds_its_records_images_and_label(cache_dir):
    batch = joined(batches(cache_dir, 5))
    assert batch.mean.shape == batch.std.shape == (N, 2, *SHAPE) and batch.mean.dtype == np.float16
    assert batch.label.dtype == batch.epoch.dtype == batch.record.dtype == np.int32
    ids = batch.record[:, None, None, None]
    np.testing.assert_array_equal(batch.mean[:, 0], np.broadcast_to(ids, (N, *SHAPE)))
    np.testing.assert_array_equal(batch.mean[:, 1], np.broadcast_to(-ids, (N, *SHAPE)))
    assert (batch.std == 0.5).all()
    np.testing.assert_array_equal(batch.label, batch.record % 5)


def test_without_flips_only_the_unflipped_image_is_read(cache_dir):
    plain, flipped = joined(batches(cache_dir, 5, flip=False)), joined(batches(cache_dir, 5))
    assert plain.mean.shape == (N, 1, *SHAPE)
    np.testing.assert_array_equal(plain.mean[:, 0], flipped.mean[:, 0])
    np.testing.assert_array_equal(plain.record, flipped.record)  # the same order


def test_deterministic_for_a_seed_and_different_across_seeds(cache_dir):
    for a, b in zip(batches(cache_dir, 3, seed=1), batches(cache_dir, 3, seed=1)):
        assert_batches_equal(a, b)
    a, c = joined(batches(cache_dir, 3, seed=1)), joined(batches(cache_dir, 3, seed=2))
    assert not np.array_equal(a.record, c.record)


def test_two_processes_split_each_global_batch_disjointly(cache_dir):
    whole = batches(cache_dir, 5, seed=5)
    parts = [batches(cache_dir, 5, seed=5, process_index=p, process_count=2) for p in range(2)]
    for step in range(5):
        first, second = parts[0][step], parts[1][step]
        assert len(first.record) == 4 and not set(first.record) & set(second.record)
        assert_batches_equal(joined([first, second]), whole[step])
    assert sorted(np.concatenate([b.record for p in parts for b in p])) == list(range(N))  # the epoch, together


def test_resume_continues_at_the_exact_next_batch(cache_dir):
    straight = batches(cache_dir, 8, seed=7)
    first = CacheBatches(cache_dir, 8, seed=7, process_index=0, process_count=1)
    for _ in range(3):
        first.next()
    resumed = CacheBatches(cache_dir, 8, seed=7, process_index=0, process_count=1)
    resumed.set_state(first.get_state())
    for expected in straight[3:]:
        assert_batches_equal(resumed.next(), expected)


def noise_of(x, batch, scale=2.0, std=0.5):
    """(the flip each latent shows, its N(0, 1) noise): x = (+-i + std * noise) * scale for record i, so the
    nearest of +-i to its average is the image it was drawn from."""
    ids = batch.record[:, None, None, None].astype(np.float32)
    distance = lambda image: np.abs(x / scale - image).reshape(len(x), -1).mean(1)
    flipped = distance(-ids) < distance(ids)
    picked = np.where(flipped[:, None, None, None], -ids, ids)
    return flipped, (x / scale - picked) / std


def test_the_step_draws_scaled_posterior_samples_with_both_flips(cache_dir):
    batch = joined(batches(cache_dir, 10))  # two epochs: every record twice
    x, y = map(np.asarray, draw(batch, 0, 2.0))
    assert x.dtype == np.float32 and x.shape == (2 * N, *SHAPE)
    np.testing.assert_array_equal(y, batch.label)
    flipped, noise = noise_of(x, batch)
    assert 0.3 < flipped[batch.record > 0].mean() < 0.7  # each image about half the time
    assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1 and np.abs(noise).max() < 6  # N(0, 1)
    first, second = noise[:N], noise[N:]  # each record once per epoch: a fresh sample each time
    for i in range(N):
        assert not np.allclose(first[batch.record[:N] == i], second[batch.record[N:] == i])


def test_the_draw_depends_on_seed_epoch_and_record_only_and_flips_keep_the_noise(cache_dir):
    batch = joined(batches(cache_dir, 10))
    x = np.asarray(draw(batch, 0, 2.0)[0])
    moved = np.random.default_rng(0).permutation(2 * N)  # where a record sits in the batch does not matter
    np.testing.assert_array_equal(np.asarray(draw(type(batch)(*(a if a is None else a[moved] for a in batch)), 0, 2.0)[0]), x[moved])
    assert not np.allclose(np.asarray(draw(batch, 1, 2.0)[0]), x)  # another seed, other samples
    plain = joined(batches(cache_dir, 10, flip=False))
    flipped, noise = noise_of(x, batch)
    never, plain_noise = noise_of(np.asarray(draw(plain, 0, 2.0)[0]), plain)
    assert flipped.any() and not never[plain.record > 0].any()  # without flips, the unflipped image only
    np.testing.assert_allclose(plain_noise, noise, atol=1e-5)  # with the same noise


def test_epoch_order_drops_the_partial_batch_and_rejects_a_batch_larger_than_the_data():
    order = EpochOrder(num_records=10, global_batch=4, seed=0)
    assert order.batches_per_epoch == 2
    assert order(8)[0] == 1  # element 8 opens the second epoch: records 8 and 9 of epoch 0 are skipped
    with pytest.raises(UserError, match="fewer than one global batch"):
        EpochOrder(num_records=3, global_batch=4, seed=0)


def test_a_missing_cache_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(UserError, match="python -m dit.data.extract"):
        CacheBatches(tmp_path / "nowhere", 8, seed=0)


def test_training_from_the_cache_resumes_bitwise_after_a_crash(tmp_path):
    """The iterator state travels in the checkpoint: a resumed run reads the same batches as a straight one."""
    from dit.config import ModelConfig, RunConfig, TrainConfig
    from dit.objectives import make_objective
    from dit.run import train_run

    shape = (8, 8, 4)
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(24, 2, *shape)).astype(np.float16)
    (tmp_path / "cache").mkdir()
    latent_cache.write_shard(tmp_path / "cache", 0, latent_cache.Shard(
        mean, np.full_like(mean, 0.1), rng.integers(0, 4, 24).astype(np.int32), np.arange(24), []))
    latent_cache.build_manifest(tmp_path / "cache", {"scale_factor": 0.5}, list("abcd"), {}, shape, 1)
    run = RunConfig(model=ModelConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=4),
                    train=TrainConfig(steps=8, batch_size=8, ckpt_every=2, log_every=2))

    class Crashing(CacheBatches):
        def next(self):
            if self.batches == 5:
                raise KeyboardInterrupt
            return super().next()

    straight = train_run(run, tmp_path / "a", CacheBatches(tmp_path / "cache", 8, seed=0), make_objective(run),
                         progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_run(run, tmp_path / "b", Crashing(tmp_path / "cache", 8, seed=0), make_objective(run), progress=False)
    resumed = train_run(run, tmp_path / "b", CacheBatches(tmp_path / "cache", 8, seed=0), make_objective(run),
                        resume=True, progress=False)
    assert resumed["params_sha256"] == straight["params_sha256"]


def test_on_the_fly_images_are_cropped_flipped_encoded_and_resumable(tmp_path):
    from dit.autoencoder import PixelAutoencoder
    from dit.data.images import find_images, load_image
    from dit.data.pipeline import ImageBatches
    from tests.fake_imagenet import make_class_folders

    make_class_folders(tmp_path / "images", classes=3, per_class=4, size=(24, 20))
    make = lambda: ImageBatches(tmp_path / "images", PixelAutoencoder(), 8, global_batch=8, seed=1,
                                process_index=0, process_count=1)
    source = make()
    straight = [source.next() for _ in range(4)]
    image_set = find_images(tmp_path / "images")
    crops = [load_image(path, 8).astype(np.float32) / 127.5 - 1 for path, _ in image_set.files]
    batch = straight[0]
    assert batch.mean.shape == batch.std.shape == (8, 1, 8, 8, 3) and (batch.std == 0).all()
    assert batch.label.dtype == np.int32 and (batch.epoch == 0).all()
    for image, label, record in zip(batch.mean[:, 0], batch.label, batch.record):
        # The pixel autoencoder returns the record's crop, or its mirror, exactly.
        crop = crops[record]
        assert np.allclose(image, crop, atol=1e-6) or np.allclose(image, crop[:, ::-1], atol=1e-6)
        assert image_set.files[record][1] == label
    first = make()
    first.next(), first.next()
    again = make()
    again.set_state(first.get_state())
    for expected in straight[2:]:
        assert_batches_equal(again.next(), expected)


def test_the_on_the_fly_reader_decodes_a_large_jpeg_reduced_as_extraction_does(tmp_path, monkeypatch):
    """A 13000x13000 photo was OOM-killed on the fly: both paths must share the reader that decodes it reduced."""
    from dit.data.images import find_images, load_images
    from dit.data.pipeline import _ReadImage
    from tests.fake_imagenet import random_image
    from tests.test_images import spy_on_jpeg_draft

    (tmp_path / "images" / "big").mkdir(parents=True)
    random_image(np.random.default_rng(0), (750, 750)).resize((6000, 6000)).save(
        tmp_path / "images" / "big" / "0.jpg", quality=90)
    image_set = find_images(tmp_path / "images")
    decoded = spy_on_jpeg_draft(monkeypatch)
    image, label = _ReadImage(image_set, 64, EpochOrder(1, 1, seed=0), flip=False)(0)
    assert image.shape == (64, 64, 3) and label == 0 and decoded == [(750, 750)]
    extracted, _, _ = load_images(image_set, [0], 64)
    np.testing.assert_array_equal(image, extracted[0])
