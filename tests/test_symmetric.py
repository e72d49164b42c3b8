"""Symmetric products (``syrk``) equal ``x.T @ x``; the moments built from them are unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from rba_store.solve import normal_eq
from rba_store.solve._backend import to_numpy
from rba_store.solve.normal_eq import NormalEquations
from rba_store.solve.symmetric import symmetric_flops, symmetric_product
from rba_store.stats import moments
from rba_store.stats.moments import Moments, Pair, PairMoments, band_pairs, point_columns

SHAPES = [(1, 1), (1, 7), (2, 5), (7, 1), (13, 3), (97, 31), (128, 64), (257, 129), (1001, 67)]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(b).max())
    return float(np.abs(a - b).max()) / scale if scale else float(np.abs(a).max())


def random_rows(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Rows with a large mean, as activations have."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) + rng.normal(size=shape[1]) * 5


@pytest.mark.parametrize("shape", SHAPES)
def test_symmetric_product_equals_the_general_product(shape: tuple[int, int], xp) -> None:  # type: ignore[no-untyped-def]
    a = random_rows(shape)
    got = to_numpy(symmetric_product(xp.asarray(a), xp))
    assert got.dtype == np.float64 and got.shape == (shape[1], shape[1])
    assert rel_err(got, a.T @ a.copy()) < 1e-12
    np.testing.assert_array_equal(got, got.T)  # both triangles, exactly mirrored


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, 5:40],  # a column block of wider rows (the joint moments' case)
        lambda a: a[3:, :],  # a row block
        lambda a: np.asfortranarray(a),
        lambda a: a[::2, ::3],  # no unit stride: NumPy's matmul cannot hand it to BLAS
        lambda a: a.T[:, :64].T,
    ],
)
def test_symmetric_product_of_views(view) -> None:  # type: ignore[no-untyped-def]
    a = view(random_rows((211, 83), seed=1))
    expected = np.ascontiguousarray(a).T @ np.ascontiguousarray(a).copy()
    assert rel_err(symmetric_product(a), expected) < 1e-12


def test_symmetric_product_keeps_float32_when_asked() -> None:
    """``gemm_dtype="float32"`` is an explicit opt-in: the product stays in the caller's dtype."""
    a = random_rows((300, 40)).astype(np.float32)
    got = symmetric_product(a)
    assert got.dtype == np.float32
    assert rel_err(got.astype(np.float64), a.astype(np.float64).T @ a.astype(np.float64)) < 1e-5


def test_symmetric_flops_count_one_triangle() -> None:
    assert symmetric_flops(10, 4) == 10 * 4 * 5
    assert symmetric_flops(1000, 768) < 2 * 1000 * 768**2 / 1.99


def test_normal_equations_use_the_symmetric_product(xp) -> None:  # type: ignore[no-untyped-def]
    x, y = random_rows((517, 33), seed=2), random_rows((517, 9), seed=3)
    ne = NormalEquations.from_chunk(xp.asarray(x), xp.asarray(y), xp).to_numpy()
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    assert rel_err(ne.sxx, xc.T @ xc.copy()) < 1e-12
    np.testing.assert_array_equal(ne.sxx, ne.sxx.T)
    assert rel_err(ne.sxy, xc.T @ yc) < 1e-12
    t = normal_eq.solve(ne).t
    assert rel_err(t, np.linalg.lstsq(x, y, rcond=None)[0]) < 1e-10


def test_float32_normal_equations_stay_an_explicit_opt_in() -> None:
    x, y = random_rows((400, 20), seed=4), random_rows((400, 6), seed=5)
    ne64 = NormalEquations.from_chunk(x, y)
    ne32 = NormalEquations.from_chunk(x, y, gemm_dtype="float32")
    assert ne32.sxx.dtype == np.float64 and ne32.sxy.dtype == np.float64
    assert 0 < rel_err(ne32.sxx, ne64.sxx) < 1e-5  # float32 rounding, as before


def direct_blocks(z: np.ndarray, widths: Sequence[int], pairs: Sequence[Pair]) -> dict:  # type: ignore[type-arg]
    zc = z - z.mean(axis=0)
    full = zc.T @ zc.copy()  # a general GEMM, both halves
    cols = point_columns(widths)
    return {(a, b): full[cols[a], cols[b]] for a, b in pairs}


CASES = [
    ([64] * 13, band_pairs(13, None)),  # the embedded default: one group of 832 columns
    ([5, 7, 3, 9, 2], band_pairs(5, 1)),
    ([5, 7, 3, 9, 2], band_pairs(5, None)),
    ([700, 324, 1, 200, 100], band_pairs(5, None)),  # 700 + 324 = 1024: a group's exact edge
    ([700, 325, 1], band_pairs(3, None)),  # one column past the edge
    ([1100, 3, 4], band_pairs(3, None)),  # a point wider than a group alone
    ([4, 4, 4, 4, 4], ((0, 2), (1, 1), (1, 3), (2, 2), (2, 4), (4, 4))),  # no run of cliques
    ([6, 6, 6, 6, 6, 6], (*band_pairs(4, 2), (4, 4), (5, 5), (1, 4), (2, 4), (2, 5), (3, 5))),
]


@pytest.mark.parametrize(("widths", "pairs"), CASES)
@pytest.mark.parametrize("rows", [1, 2, 37])
def test_pair_moments_equal_the_direct_product(
    widths: list[int], pairs: tuple[Pair, ...], rows: int, xp
) -> None:  # type: ignore[no-untyped-def]
    z = random_rows((rows, sum(widths)), seed=rows)
    got = PairMoments.from_rows(xp.asarray(z), widths, pairs, xp)
    expected = direct_blocks(z, widths, pairs)
    for pair, block in expected.items():
        assert rel_err(got.block(*pair), block) < 1e-12 or np.abs(block).max() < 1e-12, pair
    assert got.n == rows


@pytest.mark.parametrize("group_columns", [0, 1, 7, 12, 13, 64])
def test_any_grouping_of_the_points_gives_the_same_blocks(
    group_columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Column-block edges: groups cut anywhere (0: each point alone) change nothing."""
    monkeypatch.setattr(moments, "GROUP_COLUMNS", group_columns)
    widths, pairs = [3, 4, 5, 6, 1, 2], band_pairs(6, 3)
    z = random_rows((53, sum(widths)), seed=6)
    got = PairMoments.from_rows(z, widths, pairs)
    for pair, block in direct_blocks(z, widths, pairs).items():
        assert rel_err(got.block(*pair), block) < 1e-12, pair


@pytest.mark.parametrize("group_columns", [0, 3, 7, 9, 11])
@pytest.mark.parametrize("band", [None, 2])
def test_points_sharing_their_partners_give_the_same_blocks(
    group_columns: int, band: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across groups, consecutive points with the same partners share one GEMM."""
    monkeypatch.setattr(moments, "GROUP_COLUMNS", group_columns)
    widths = [3, 4, 3, 2, 4, 3, 1]
    pairs = band_pairs(len(widths), band)
    z = random_rows((41, sum(widths)), seed=8)
    got = PairMoments.from_rows(z, widths, pairs)
    for pair, block in direct_blocks(z, widths, pairs).items():
        assert rel_err(got.block(*pair), block) < 1e-12, pair


def test_shared_partners_follow_the_partners_and_the_width_limit() -> None:
    partners = {0: [2, 3, 4], 1: [2, 3, 4], 2: [4], 3: [4], 5: [6, 7]}
    assert moments._shared_partners(partners, [500, 524, 1, 1, 1, 1, 1, 1]) == [
        ([0, 1], [2, 3, 4]),
        ([2, 3], [4]),
        ([5], [6, 7]),
    ]
    assert moments._shared_partners(partners, [500, 525, 1, 1, 1, 1, 1, 1])[:2] == [
        ([0], [2, 3, 4]),
        ([1], [2, 3, 4]),
    ]


def test_groups_follow_the_pairs_and_the_width_limit() -> None:
    assert moments.GROUP_COLUMNS == 1024
    assert moments._point_groups([64] * 13, set(band_pairs(13, None))) == [list(range(13))]
    assert moments._point_groups([5, 7, 3, 9], set(band_pairs(4, 1))) == [[0, 1], [2, 3]]
    assert moments._point_groups([700, 324, 1], set(band_pairs(3, None))) == [[0, 1], [2]]


def test_joint_moments_equal_the_direct_product() -> None:
    z = random_rows((301, 45), seed=7)
    got = Moments.from_rows(z)
    zc = z - z.mean(axis=0)
    assert rel_err(got.m2, zc.T @ zc.copy()) < 1e-12
    np.testing.assert_array_equal(got.m2, got.m2.T)
