"""The grain pipeline over the latent cache: order, sharding over processes, resume, fresh samples."""

import numpy as np
import pytest

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
                         np.broadcast_to(-ids[:, None, None, None], (len(ids), *SHAPE))], 1).astype(np.float32)
        latent_cache.write_shard(out, k, latent_cache.Shard(
            mean, np.full_like(mean, 0.5), (ids % 5).astype(np.int32), ids.astype(np.int64), []))
    latent_cache.build_manifest(out, {"scale_factor": 2.0}, [str(c) for c in range(5)], {}, SHAPE,
                                len(latent_cache.shard_ranges(N, 16)))
    return out


def record_ids(x: np.ndarray) -> np.ndarray:
    """Which record a latent came from: its scaled mean is +-2i, the noise, 0.5 x 2 x N(0, 1) per value,
    averages to +-0.125 over the 64 values."""
    return np.abs(np.round(x.reshape(len(x), -1).mean(1) / 2.0)).astype(int)


def take(source, n):
    return [source.next() for _ in range(n)]


def test_without_flips_every_read_is_the_unflipped_record_with_the_same_noise(cache_dir):
    flipped = take(CacheBatches(cache_dir, global_batch=8, seed=3, process_index=0, process_count=1), 10)
    plain = take(CacheBatches(cache_dir, global_batch=8, seed=3, process_index=0, process_count=1, flip=False), 10)
    x = np.concatenate([x for x, _ in plain])
    assert (np.sign(x.reshape(len(x), -1).mean(1))[record_ids(x) > 0] > 0).all()  # never the -i flipped mean
    for (a, _), (b, _) in zip(flipped, plain):  # the same order and posterior noise: equal up to the flip
        residual = lambda x: x - 2.0 * np.round(x.reshape(8, -1).mean(1) / 2.0)[:, None, None, None]
        np.testing.assert_allclose(residual(a), residual(b), atol=1e-5)


def test_every_record_once_per_epoch_and_a_new_order_each_epoch(cache_dir):
    source = CacheBatches(cache_dir, global_batch=8, seed=3, process_index=0, process_count=1)
    epoch0 = np.concatenate([record_ids(x) for x, _ in take(source, 5)])
    epoch1 = np.concatenate([record_ids(x) for x, _ in take(source, 5)])
    assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
    assert not np.array_equal(epoch0, epoch1)


def test_labels_match_records_and_latents_are_scaled_fresh_samples(cache_dir):
    source = CacheBatches(cache_dir, global_batch=8, seed=3, process_index=0, process_count=1)
    xs, ys = zip(*take(source, 10))
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (80, *SHAPE)
    np.testing.assert_array_equal(y, record_ids(x) % 5)
    signs = np.sign(x.reshape(80, -1).mean(1))[record_ids(x) > 0]
    assert (signs > 0).any() and (signs < 0).any()  # both flips are drawn
    residual = x - 2.0 * np.round(x.reshape(80, -1).mean(1) / 2.0)[:, None, None, None]
    assert 0.7 < residual.std() < 1.3  # scale 2 x std 0.5 x N(0, 1)
    first, second = x[:40], x[40:]  # each record read once per epoch: the two reads differ
    for i in range(N):
        a, b = first[record_ids(first) == i], second[record_ids(second) == i]
        assert not np.allclose(a, b)


def test_deterministic_for_a_seed_and_different_across_seeds(cache_dir):
    a = take(CacheBatches(cache_dir, 8, seed=1, process_index=0, process_count=1), 3)
    b = take(CacheBatches(cache_dir, 8, seed=1, process_index=0, process_count=1), 3)
    c = take(CacheBatches(cache_dir, 8, seed=2, process_index=0, process_count=1), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_two_processes_split_each_global_batch_disjointly(cache_dir):
    whole = take(CacheBatches(cache_dir, 8, seed=5, process_index=0, process_count=1), 5)
    parts = [take(CacheBatches(cache_dir, 8, seed=5, process_index=p, process_count=2), 5) for p in range(2)]
    for step in range(5):
        x0, y0 = parts[0][step]
        x1, y1 = parts[1][step]
        assert not set(record_ids(x0)) & set(record_ids(x1))
        np.testing.assert_array_equal(np.concatenate([x0, x1]), whole[step][0])
        np.testing.assert_array_equal(np.concatenate([y0, y1]), whole[step][1])
    seen = np.concatenate([record_ids(x) for p in parts for x, _ in p])
    assert sorted(seen) == list(range(N))  # together they cover the epoch


def test_resume_continues_at_the_exact_next_batch(cache_dir):
    straight = take(CacheBatches(cache_dir, 8, seed=7, process_index=0, process_count=1), 8)
    first = CacheBatches(cache_dir, 8, seed=7, process_index=0, process_count=1)
    take(first, 3)
    state = first.get_state()
    resumed = CacheBatches(cache_dir, 8, seed=7, process_index=0, process_count=1)
    resumed.set_state(state)
    for (x, y), (xs, ys) in zip(take(resumed, 5), straight[3:]):
        np.testing.assert_array_equal(x, xs)
        np.testing.assert_array_equal(y, ys)


def test_worker_processes_give_the_same_batches(cache_dir):
    inline = take(CacheBatches(cache_dir, 8, seed=9, process_index=0, process_count=1), 4)
    source = CacheBatches(cache_dir, 8, seed=9, process_index=0, process_count=1, workers=2)
    for (x, y), (xi, yi) in zip(take(source, 4), inline):
        np.testing.assert_array_equal(x, xi)
        np.testing.assert_array_equal(y, yi)


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
    from dit.train import train

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

    straight = train(run, tmp_path / "a", CacheBatches(tmp_path / "cache", 8, seed=0), make_objective(run),
                     progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(run, tmp_path / "b", Crashing(tmp_path / "cache", 8, seed=0), make_objective(run), progress=False)
    resumed = train(run, tmp_path / "b", CacheBatches(tmp_path / "cache", 8, seed=0), make_objective(run),
                    resume=True, progress=False)
    assert resumed["params_sha256"] == straight["params_sha256"]


def test_on_the_fly_images_are_cropped_flipped_encoded_and_resumable(tmp_path):
    from dit.autoencoder import PixelAutoencoder
    from dit.data.images import find_images, load_image
    from dit.data.pipeline import ImageBatches
    from tests.fake_imagenet import make_class_folders

    make_class_folders(tmp_path / "images", classes=3, per_class=4, size=(24, 20))
    make = lambda: ImageBatches(tmp_path / "images", PixelAutoencoder(), 1.0, 8, global_batch=8, seed=1,
                                process_index=0, process_count=1)
    straight = take(make(), 4)
    image_set = find_images(tmp_path / "images")
    crops = [load_image(path, 8).astype(np.float32) / 127.5 - 1 for path, _ in image_set.files]
    x, y = straight[0]
    assert x.shape == (8, 8, 8, 3) and y.dtype == np.int32
    for image, label in zip(x, y):  # the pixel autoencoder returns each crop, or its mirror, exactly
        match = [i for i, c in enumerate(crops) if np.allclose(image, c, atol=1e-6) or
                 np.allclose(image, c[:, ::-1], atol=1e-6)]
        assert match and image_set.files[match[0]][1] == label
    resumed = make()
    take(resumed, 2)
    state = resumed.get_state()
    again = make()
    again.set_state(state)
    for (xa, ya), (xs, ys) in zip(take(again, 2), straight[2:]):
        np.testing.assert_array_equal(xa, xs)
        np.testing.assert_array_equal(ya, ys)


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
