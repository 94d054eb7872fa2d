"""The demo's feature network: accurate, deterministic, trained once per cache, and a Frechet distance in
its features that sees what FID would (identity, noise, mode collapse)."""

import json
import shutil

import jax
import numpy as np
import pytest

import dit.eval.digits_classifier as dc
from dit.data.demo import demo_cache
from dit.errors import UserError
from dit.eval.metrics import frechet_distance, statistics
from dit.files import sha256_of
from dit.sample import to_uint8


@pytest.fixture(scope="module")
def cache(tmp_path_factory, digits_data):
    """The demo's default cache with the classifier its first use trained (the session's copy: trained once
    at XLA's default optimisation level, see conftest)."""
    root = tmp_path_factory.mktemp("demo")
    shutil.copytree(digits_data, root / "data")
    return demo_cache(root / "data" / "digits", progress=False)


@pytest.fixture(scope="module")
def classifier(cache):
    return dc.load_or_train(cache)  # the session's default training, loaded from where it was saved


@pytest.fixture(scope="module")
def digits(cache):
    return dc.cache_images(dc.LatentCache(cache))  # uint8 (N, 2, H, W, 3), labels


def fast_training(calls: list):
    """train_classifier with few steps, counting its calls."""
    original = dc.train_classifier

    def train(cache_dir, seed=0, **_):
        calls.append(cache_dir)
        return original(cache_dir, seed=seed, steps=20, batch=32)

    return train


def test_quantisation_matches_the_samplers():
    # One quantisation (dit.autoencoder.to_uint8) for the samplers and the classifier: a copy of it fails here.
    assert dc.to_uint8 is to_uint8
    x = np.linspace(-1.2, 1.2, 1001, dtype=np.float32)
    np.testing.assert_array_equal(dc.to_uint8(x), np.asarray(to_uint8(x)))


def test_the_default_training_is_accurate_and_survives_saving(classifier, digits):
    images, labels = digits
    _, held_out = dc.held_out_split(len(labels), seed=0)
    assert classifier.accuracy >= 0.9
    assert classifier.meta["seconds"] < 60 and classifier.meta["steps"] == dc.DEFAULT_STEPS
    # The reloaded weights reproduce the accuracy measured before saving.
    accuracy = float((classifier.predict(images[held_out, 0]) == labels[held_out]).mean())
    assert accuracy == pytest.approx(classifier.accuracy)
    features = classifier.features(images[:5, 0])
    assert features.shape == (5, dc.FEATURES) and features.dtype == np.float32
    # Batching (zero-padded tails) does not change a feature.
    np.testing.assert_allclose(classifier.features(images[:300, 0], batch_size=128)[:5], features, atol=1e-5)
    with pytest.raises(UserError, match="uint8"):
        classifier.features(images[:5, 0].astype(np.float32))


def test_training_is_deterministic_for_a_seed(cache):
    first, report = dc.train_classifier(cache, seed=3, steps=20, batch=32)
    second, _ = dc.train_classifier(cache, seed=3, steps=20, batch=32)
    other, _ = dc.train_classifier(cache, seed=4, steps=20, batch=32)
    leaves = jax.tree.leaves(first)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(second)))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(other)))
    assert set(report) >= {"train_accuracy", "heldout_accuracy", "steps", "seconds"} and report["steps"] == 20


def test_load_or_train_reuses_the_saved_classifier(cache, classifier, monkeypatch):
    path = dc.classifier_path(cache)
    assert path == classifier.path and path.parent == cache.parent and path.name == "classifier-16.npz"
    assert classifier.sha256 == sha256_of(path)
    stamp = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although a matching classifier is saved")

    monkeypatch.setattr(dc, "train_classifier", no_training)
    again = dc.load_or_train(cache)
    assert path.stat().st_mtime_ns == stamp and again.sha256 == classifier.sha256
    assert again.meta["manifest_sha256"] == dc.manifest_sha256(cache)
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_a_changed_cache_retrains(cache, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "digits" / cache.name
    shutil.copytree(cache, copy)
    calls = []
    monkeypatch.setattr(dc, "train_classifier", fast_training(calls))
    first = dc.load_or_train(copy)
    assert len(calls) == 1 and "training the digits feature classifier (once)" in capsys.readouterr().out
    assert dc.load_or_train(copy).sha256 == first.sha256 and len(calls) == 1

    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "note": "re-extracted"}))
    retrained = dc.load_or_train(copy)
    assert len(calls) == 2 and retrained.meta["manifest_sha256"] != first.meta["manifest_sha256"]
    assert dc.load_or_train(copy, seed=1).meta["seed"] == 1 and len(calls) == 3  # another seed is another model


def test_the_frechet_distance_in_its_features(cache, classifier, digits):
    images, labels = digits
    reference = dc.digits_reference(cache, classifier)
    assert reference.count == len(labels) and reference.features.shape == (len(labels), dc.FEATURES)
    assert reference.meta["metric"] == dc.METRIC_NAME and reference.meta["classifier_sha256"] == classifier.sha256

    def fd(batch: np.ndarray, against=None) -> float:
        mu, sigma = statistics(classifier.features(batch))
        ref_mu, ref_sigma = (reference.mu, reference.sigma) if against is None else statistics(against)
        return frechet_distance(mu, sigma, ref_mu, ref_sigma)

    order = np.random.default_rng(0).permutation(len(labels))
    half_a, half_b = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    features_b = classifier.features(images[half_b, 0])
    noise = np.random.default_rng(1).integers(0, 256, images[:, 0].shape, dtype=np.uint8)
    one_class = half_a[labels[half_a] == 3]

    itself = fd(images[:, 0])
    halves = fd(images[half_a, 0], features_b)
    versus_noise = fd(noise, features_b)
    collapsed = fd(images[one_class, 0], features_b)
    print(f"fd_digits: itself {itself:.3g}, disjoint halves {halves:.4g}, one class {collapsed:.4g}, "
          f"noise {versus_noise:.4g}")
    assert abs(itself) < 1e-6 * halves
    assert collapsed > 5 * halves  # mode collapse is seen
    assert versus_noise > 20 * halves
