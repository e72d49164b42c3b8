"""Diffused redundancy: probes from joint moments equal lstsq; the training rows are read once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rba_store.cli import main
from rba_store.readings.probe import (
    KINDS,
    PROBE,
    PointSystem,
    channels_for,
    critical_mass,
    parse_fractions,
    probe_weights,
    run_probe,
    train_moments,
)
from rba_store.store import Store
from tests._readings import labelled_store, stored_labels, stored_vectors
from tests.conftest import tree_digest


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A training store (95 samples, 4 shards) and an evaluation store of the same "model"."""
    folder = tmp_path_factory.mktemp("probe")
    train = labelled_store(folder / "train.zarr", channels=16)
    evaluation = labelled_store(folder / "eval.zarr", n_samples=64, channels=16, seed=1)
    return train, evaluation


def lstsq_probe(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The affine ridge probe by ``numpy.linalg.lstsq`` on the ridge-augmented rows: a column of
    ones (unpenalised bias) and sqrt(λ)·I rows under X, λ = ridge · trace(Xcᵀ Xc) / m."""
    n, m = x.shape
    xc = x - x.mean(axis=0)
    lam = ridge * np.trace(xc.T @ xc) / m
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(lam) * np.eye(m), np.zeros((m, 1))]])
    b = np.vstack([y, np.zeros((m, y.shape[1]))])
    solution = np.linalg.lstsq(a, b, rcond=None)[0]
    return solution[:m], solution[m]


def test_probe_from_moments_equals_lstsq_on_the_rows(stores: tuple[Path, Path]) -> None:
    train, _ = stores
    store = Store.open(train)
    labels = stored_labels(train)
    indices = np.arange(len(labels))
    point, ridge = 2, 1e-2
    (moments,) = train_moments(store, indices, labels, 4, [point], "cls")
    system = PointSystem.from_moments(moments, 16)
    x, y = stored_vectors(train, point), np.eye(4)[labels]
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(16, size=5, replace=False))
    pca = system.pca()[:, :6]
    projection = rng.standard_normal((16, 7)) / np.sqrt(7)
    cases = {
        "random subset": (system.columns(subset), x[:, subset]),
        "pca subset": (system.projected(pca), x @ pca),
        "projection": (system.projected(projection), x @ projection),
    }
    for case, (equations, rows) in cases.items():
        w, b = probe_weights(equations, ridge)
        w_ref, b_ref = lstsq_probe(rows, y, ridge)
        scale = max(np.abs(w_ref).max(), 1.0)
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-8 * scale, err_msg=case)
        np.testing.assert_allclose(b, b_ref, rtol=0, atol=1e-8 * scale, err_msg=case)
    # the principal directions are those of the training rows' covariance
    xc = x - x.mean(axis=0)
    eigvals = np.linalg.eigvalsh(xc.T @ xc)[::-1]
    np.testing.assert_allclose(np.diag(pca.T @ (xc.T @ xc) @ pca), eigvals[:6], rtol=1e-9)


def test_cka_of_a_subset_with_its_layer_from_the_moments(stores: tuple[Path, Path]) -> None:
    train, _ = stores
    labels = stored_labels(train)
    (moments,) = train_moments(Store.open(train), np.arange(len(labels)), labels, 4, [3], "cls")
    system = PointSystem.from_moments(moments, 16)
    x = stored_vectors(train, 3)
    keep = np.array([1, 4, 9])
    xc, sc = x - x.mean(axis=0), x[:, keep] - x[:, keep].mean(axis=0)
    k, s = xc @ xc.T, sc @ sc.T  # sample-space CKA, an independent formula
    expected = np.sum(k * s) / np.sqrt(np.sum(k * k) * np.sum(s * s))
    assert system.cka_of(np.eye(16)[:, keep]) == pytest.approx(expected, rel=1e-10)
    assert system.cka_of(np.eye(16)) == pytest.approx(1.0)


def test_training_rows_are_read_once_for_the_whole_grid(
    stores: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, evaluation = stores
    store = tmp_path / "train.zarr"
    shutil.copytree(train, store)
    reads: list[tuple[str, int, int]] = []
    original = Store.read_points

    def counting(self: Store, points: list[int], start: int, stop: int) -> list[np.ndarray]:
        reads.append((self.path.name, start, stop))
        return original(self, points, start, stop)

    monkeypatch.setattr(Store, "read_points", counting)
    n_train = Store.open(store).layout.n_shards
    n_eval = Store.open(evaluation).layout.n_shards
    assert n_train >= 3
    fractions, seeds = (0.1, 0.25, 0.5, 1.0), 3
    result, how = run_probe(
        store, fractions=fractions, seeds=seeds, eval_store=evaluation, backend="numpy"
    )
    assert how == "computed"
    assert result.accuracy.shape == (4, len(KINDS), len(fractions), seeds)  # 4 points, 48 probes
    train_reads = [r for r in reads if r[0] == "train.zarr"]
    assert len(train_reads) == n_train and len(set(train_reads)) == n_train  # each shard once
    assert len([r for r in reads if r[0] == "eval.zarr"]) == n_eval

    reads.clear()  # another grid: the saved moments answer, only the evaluation rows are read
    again, how = run_probe(store, fractions=(0.5, 1.0), seeds=2, eval_store=evaluation)
    assert how == "moments reused"
    assert [r[0] for r in reads] == ["eval.zarr"] * n_eval
    np.testing.assert_array_equal(again.full_accuracy, result.full_accuracy)

    reads.clear()  # the same grid again: nothing is read
    digest = tree_digest(store)
    _, how = run_probe(store, fractions=(0.5, 1.0), seeds=2, eval_store=evaluation)
    assert how == "reused" and reads == []
    assert tree_digest(store) == digest


def test_accuracy_grows_with_the_fraction_and_critical_mass(stores: tuple[Path, Path]) -> None:
    train, evaluation = stores
    result, _ = run_probe(
        train, fractions=(0.0625, 0.25, 1.0), eval_store=evaluation, save=False, seeds=2
    )
    random = result.accuracy[:, 0].mean(axis=2)  # (points, fractions)
    assert (random[:, -1] >= random[:, 0]).all()
    np.testing.assert_allclose(random[:, -1], result.full_accuracy)  # all channels: the layer
    assert result.full_accuracy[-1] > 0.9  # the classes separate at the last point
    masses = result.critical_masses()
    assert masses.shape == (4, len(KINDS))
    assert np.isin(masses[:, 0], result.fractions).all()
    assert result.channels[0].tolist() == [channels_for(f, 16) for f in (0.0625, 0.25, 1.0)]


def test_critical_mass_is_where_the_curve_stays_within_delta() -> None:
    grid = (0.01, 0.1, 0.5, 1.0)
    assert critical_mass(np.array([0.5, 0.95, 0.99, 1.0]), 1.0, grid, 1.0) == 0.5
    assert critical_mass(np.array([0.995, 0.9, 0.995, 1.0]), 1.0, grid, 1.0) == 0.5  # not 0.01
    assert critical_mass(np.array([0.95, 0.96, 0.97, 0.98]), 1.0, grid, 5.0) == 0.01
    assert np.isnan(critical_mass(np.array([0.5, 0.6, 0.7, 0.8]), 1.0, grid, 1.0))


def test_fractions_are_parsed_and_checked() -> None:
    assert parse_fractions("1%,0.5,1") == (0.01, 0.5, 1.0)
    assert parse_fractions(None)[0] == 0.01 and parse_fractions(None)[-1] == 1.0
    for bad in ("0", "1.5", "-0.1", "nan"):
        with pytest.raises(ValueError, match=r"is outside \(0, 1\]"):
            parse_fractions(bad)


def test_cli_on_the_embedded_default_scores_the_validation_split(
    small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "small.zarr"
    shutil.copytree(small_store, store)
    argv = ["probe", str(store), "--points", "6,12", "--fractions", "0.1,1", "--seeds", "2"]
    assert main([*argv, "--json", "--plots", str(tmp_path)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["eval"]["kind"] == "val" and payload["eval"]["samples"] == 360
    assert payload["ridge"] == 1e-3 and payload["train_samples"] == 50
    assert [p["point"] for p in payload["points"]] == ["h6", "h12"]
    for p in payload["points"]:
        assert {"full_accuracy", "critical_mass", "curves"} <= p.keys()
        assert set(p["curves"]) == set(KINDS)
        assert [c["fraction"] for c in p["curves"]["random"]] == [0.1, 1.0]
    assert payload["points"][1]["full_accuracy"] > 0.6  # 50 training digits, the last block
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Store.open(store).has_analysis(PROBE, "tokens-cls-points6-12")
    assert main(argv) == 0
    assert "reused the saved probe/tokens-cls-points6-12" in capsys.readouterr().out
