"""The built-in demo dataset: the digits through the real reader and cache code, in pixel space."""

import numpy as np
import pytest

from dit.data.cache import LatentCache
from dit.data.demo import DEMO_RESOLUTION, demo_cache, digits_cache
from dit.errors import UserError
from dit.data.images import find_images
from dit.data.pipeline import CacheBatches


def test_the_digits_become_a_pixel_cache_once(tmp_path):
    path = demo_cache(tmp_path / "digits", progress=False)
    image_set = find_images(tmp_path / "digits" / "images")
    assert len(image_set) == 1797 and image_set.classes == tuple(str(d) for d in range(10))
    cache = LatentCache(path)
    assert len(cache) == 1797 and cache.num_classes == 10 and not cache.manifest["skipped"]
    assert cache.latent_shape == (DEMO_RESOLUTION, DEMO_RESOLUTION, 3) and cache.scale_factor == 1.0
    mean, std, label = cache.record(0)
    assert mean.min() >= -1 and mean.max() <= 1 and mean.max() > 0.5  # ink on a black background
    np.testing.assert_array_equal(mean[0, ..., 0], mean[0, ..., 2])  # grayscale as RGB
    assert np.all(std == 0)
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert demo_cache(tmp_path / "digits", progress=False) == path
    assert (path / "manifest.json").stat().st_mtime_ns == stamp  # built once, then reused

    batch = CacheBatches(path, global_batch=32, seed=0, process_index=0, process_count=1).next()
    assert batch.mean.shape == (32, 2, DEMO_RESOLUTION, DEMO_RESOLUTION, 3) and set(batch.label) <= set(range(10))


def test_the_digits_are_never_built_over_other_files(tmp_path):
    mine = tmp_path / "mine" / "cache"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match="holds other files and no cache manifest"):
        digits_cache(mine, 8, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and not (tmp_path / "mine" / "images").exists()
