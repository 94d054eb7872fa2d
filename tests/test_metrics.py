"""Frechet distance, Inception Score and precision/recall against closed forms and pytorch-fid."""

import numpy as np
import pytest

from dit.eval.fid import frechet_distance
from dit.eval.metrics import MomentAccumulator, inception_score, precision_recall, statistics


def test_a_set_against_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 16))
    mu, sigma = statistics(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_known_gaussians_give_the_closed_form():
    rng = np.random.default_rng(1)
    # Commuting covariances: diag(a) and diag(b) -> sum (sqrt a - sqrt b)^2, plus the squared mean gap.
    a, b = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1, rel=1e-12)


def test_equals_pytorch_fid_on_the_same_features():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 64))
    b = 0.8 * rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) / 8 + 0.3
    (m1, s1), (m2, s2) = statistics(a), statistics(b)
    ours = frechet_distance(m1, s1, m2, s2)
    theirs = fid_score.calculate_frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(theirs, rel=1e-9) and ours > 1.0


def test_singular_covariances_stay_finite_and_match_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) + 0.1  # fewer samples than dimensions
    (m1, s1), (m2, s2) = statistics(a), statistics(b)
    ours = frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(ours)
    assert ours == pytest.approx(fid_score.calculate_frechet_distance(m1, s1, m2, s2), rel=1e-6)


def test_statistics_that_are_not_covariances_are_an_error():
    with pytest.raises(ValueError, match="not valid covariances"):
        frechet_distance([0.0, 0.0], [[1.0, 0.0], [0.0, -1.0]], [0.0, 0.0], np.eye(2))


def test_streamed_moments_equal_numpy():
    x = np.random.default_rng(4).normal(size=(1000, 12)) * 3 + 5
    acc = MomentAccumulator(12)
    for part in np.array_split(x, 7):
        acc.add(part)
    mu, sigma = acc.statistics()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_inception_score_bounds():
    n, k = 1000, 10
    confident_and_diverse = np.full((n, k), -50.0)
    confident_and_diverse[np.arange(n), np.arange(n) % k] = 50.0
    assert inception_score(confident_and_diverse, splits=10)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(np.zeros((n, k)), splits=10)[0] == pytest.approx(1.0, rel=1e-9)


def test_precision_and_recall_see_mode_dropping():
    rng = np.random.default_rng(5)
    real = np.concatenate([rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 20])
    same = np.concatenate([rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 20])
    one_mode = rng.normal(size=(400, 4))
    p, r = precision_recall(real, same, chunk=128)
    assert p > 0.9 and r > 0.9
    p, r = precision_recall(real, one_mode, chunk=128)
    assert p > 0.9 and 0.35 < r < 0.6  # everything generated is realistic, half the data is never produced
