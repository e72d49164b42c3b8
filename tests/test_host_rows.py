"""Row-parallel host passes (rba_store/host_rows.py): the same results on one thread as on two,
equal to the direct NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from rba_store.host_rows import blas_threads, centre_columns, over_row_blocks, row_blocks
from rba_store.stats.moments import PairMoments, band_pairs
from rba_store.stats.partials import _joint_rows


def test_blocks_cover_rows_once():
    assert row_blocks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert row_blocks(0, 4) == []
    with threadpool_limits(2, user_api="blas"):
        assert over_row_blocks(lambda s, e: (s, e), 9, 4) == [(0, 4), (4, 8), (8, 9)]


def test_blas_threads_follow_the_limit():
    with threadpool_limits(1, user_api="blas"):
        assert blas_threads() == 1
    with threadpool_limits(2, user_api="blas"):
        assert blas_threads() == 2


@pytest.mark.parametrize("rows", [1, 4095, 4096, 9001])
def test_centre_columns_is_the_mean_and_independent_of_threads(rows):
    rng = np.random.default_rng(rows)
    z = rng.normal(loc=3.0, size=(rows, 7)) * np.arange(1, 8)
    out = {}
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            zc = z.copy()
            out[threads] = (centre_columns(zc), zc)
    mean, zc = out[1]
    np.testing.assert_allclose(mean, z.mean(axis=0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(zc, z - z.mean(axis=0), rtol=1e-12, atol=1e-12)
    assert np.array_equal(out[2][0], mean) and np.array_equal(out[2][1], zc)  # bit for bit


def test_joint_moments_on_two_threads_equal_the_direct_product():
    rng = np.random.default_rng(0)
    n, t, widths = 700, 9, [5, 8, 3]  # 6,300 rows: two blocks
    points = [rng.normal(loc=k, size=(n, t, w)).astype(np.float32) for k, w in enumerate(widths)]
    z = np.concatenate([p.reshape(n * t, -1).astype(np.float64) for p in points], axis=1)
    zc = z - z.mean(axis=0)
    results = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            joint = _joint_rows(points, n, t)
            assert np.array_equal(joint, z)
            pairs = band_pairs(len(widths), None)
            results.append(PairMoments.from_rows(joint, widths, pairs, overwrite=True))
    one, two = results
    assert np.array_equal(one.mean, two.mean)
    np.testing.assert_allclose(one.mean, z.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(two.block(0, 1), zc[:, :5].T @ zc[:, 5:13], rtol=1e-10)
    np.testing.assert_allclose(two.block(2, 2), zc[:, 13:].T @ zc[:, 13:], rtol=1e-10)


def test_a_forked_child_gets_its_own_pool():
    import multiprocessing

    with threadpool_limits(2, user_api="blas"):
        over_row_blocks(lambda s, e: s, 9, 4)  # the parent's pool exists
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            assert pool.apply(_blocks_in_child) == [0, 4, 8]


def _blocks_in_child() -> list[int]:
    with threadpool_limits(2, user_api="blas"):
        return over_row_blocks(lambda s, e: s, 9, 4)
