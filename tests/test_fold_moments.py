"""Issue 20: folded fits read off the joint moments of a store that keeps the MLP outputs
(``extract --mlp-outputs``). The stored m_a against block a run on the stored h_{a-1}; the folded
fit from the moments, with the activations moved away, against float64 lstsq on X = m_a,
Y = h_b - r_a (the embedded default with a held-out split, its class tokens only, a random
Llama); refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rba_store.approx.fold_site import MlpOutputs
from rba_store.approx.rebuild import rebuild_model
from rba_store.extract import ExtractOptions, plan_extraction, run_extraction
from rba_store.solve import FitOptions, fit_spans
from rba_store.stats import compute_block_stats
from rba_store.store import STATS, Store
from rba_store.store.selection import split_holdout
from tests.test_approx import run_cli
from tests.test_language import _extract, lm  # noqa: F401 (the fixture)

SPANS = ((3, 6), (8, 11), (1, 2))
HOLDOUT = 0.25


def _mlp_store(out: Path, limit: int = 48, **extra: object) -> Store:
    options = ExtractOptions(
        limit=limit, batch_size=16, chunk_samples=8, shard_samples=16, mlp_outputs=True,
        **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    run_extraction(plan_extraction(options), out)
    return Store.open(out)


@pytest.fixture(scope="module")
def mlp_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default on 48 digits with m1..m12 stored and statistics split 75/25."""
    out = tmp_path_factory.mktemp("fold-moments") / "digits.zarr"
    _mlp_store(out)
    store = Store.open(out, "r+")
    store.write_analysis(STATS, "split", compute_block_stats(store, holdout=HOLDOUT).to_dataset())
    return out


def _rows(store: Store, name: str, samples: np.ndarray) -> np.ndarray:
    values = np.asarray(store.array(name)[:], dtype=np.float64)[samples]
    return values.reshape(-1, values.shape[-1])


def _folded_xy(store: Store, span: tuple[int, int], samples: np.ndarray) -> tuple[np.ndarray, ...]:
    """X = m_a and Y = h_b - h_a + m_a (= h_b - r_a) of ``samples``, from the stored arrays."""
    a, b = span
    x = _rows(store, f"m{a}", samples)
    return x, _rows(store, f"h{b}", samples) - _rows(store, f"h{a}", samples) + x


def _lstsq(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    solution = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
    return solution[:-1], solution[-1]


def _move_activations_away(store_path: Path, to: Path) -> None:
    to.mkdir()
    for entry in store_path.iterdir():
        if entry.name[0] in "hm" and entry.name[1:].isdigit():
            shutil.move(str(entry), str(to / entry.name))


def test_stored_mlp_outputs_are_block_a_run_on_the_stored_input(mlp_store: Path) -> None:
    store = Store.open(mlp_store)
    module = rebuild_model(store.description["model"], None, store).module
    for a in (1, 6, 12):
        h_prev = torch.from_numpy(store.point(a - 1)[:20])
        r, m = MlpOutputs(module, a, h_prev.shape[1])(h_prev)
        stored = store.array(f"m{a}")[:20]
        assert np.abs(stored - m.numpy()).max() < 1e-5
        assert np.abs(store.point(a)[:20] - (r + m).numpy()).max() < 1e-5  # h_a = r_a + m_a


def test_folded_fit_from_the_moments_equals_lstsq_with_the_activations_moved_away(
    mlp_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "digits.zarr"
    shutil.copytree(mlp_store, copy)
    store = Store.open(copy)
    fit_idx, held_idx = split_holdout(np.arange(store.layout.n_samples), HOLDOUT, 0)
    data = {s: (_folded_xy(store, s, fit_idx), _folded_xy(store, s, held_idx)) for s in SPANS}
    _move_activations_away(copy, tmp_path / "away")
    spans = [f"{a}:{b}" for a, b in SPANS]
    args = [arg for s in spans for arg in ("--span", s)]
    code, out, err = run_cli(
        capsys, "fit", copy, *args, "--fold", "--bias", "--from", "moments",
        "--holdout", HOLDOUT,
    )  # fmt: skip
    assert code == 0, err
    assert out.count("from the moments") == len(SPANS)
    options = FitOptions(spans=SPANS, fold=True, bias=True, holdout=HOLDOUT, source="moments")
    fits = fit_spans(copy, options)  # what the command saved
    for fit in fits:
        assert fit.reused and fit.diagnostics["source"]["kind"] == "moments"
        (x, y), (x_held, y_held) = data[fit.span]
        t, c = _lstsq(x, y)
        assert np.abs(fit.solution.t - t).max() <= 1e-8 * np.abs(t).max()
        assert np.abs(fit.solution.bias - c).max() <= 1e-8 * np.abs(c).max()
        sse = float(((x_held @ fit.solution.t + fit.solution.bias - y_held) ** 2).sum())
        centred = y_held - y_held.mean(axis=0)
        heldout = fit.diagnostics["heldout"]
        assert heldout["relative_mse"] == pytest.approx(sse / (y_held**2).sum(), rel=1e-8)
        assert heldout["r2"] == pytest.approx(1 - sse / (centred**2).sum(), rel=1e-8)


def test_folded_fits_from_the_moments_check_the_structure_without_the_weights(
    mlp_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing to recompute: the fold sites are checked on the architecture on the meta device
    (no weights read, no memory: 1.5 GB for ViT-B before), and the maps are the same."""
    import rba_store.approx.rebuild as rebuild

    copy = tmp_path / "digits.zarr"
    shutil.copytree(mlp_store, copy)
    options = FitOptions(spans=SPANS, fold=True, bias=True, holdout=HOLDOUT, source="moments")
    expected = {f.span: f.solution.t for f in fit_spans(copy, options)}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was rebuilt with its weights")

    monkeypatch.setattr(rebuild, "rebuild_model", refuse)
    for fit in fit_spans(copy, FitOptions(**{**options.__dict__, "name": "meta"})):
        np.testing.assert_array_equal(fit.solution.t, expected[fit.span])


def test_statistics_only_extraction_gives_the_same_folded_fits(
    mlp_store: Path, tmp_path: Path
) -> None:
    """extract --stats --no-activations --mlp-outputs: no array stored, the folded fits (and
    their held-out error) read off the moments folded during the pass equal lstsq on the
    activations of the same samples."""
    out = tmp_path / "stats-only.zarr"
    _mlp_store(out, stats=True, store_activations=False, stats_holdout=HOLDOUT)
    assert not [e for e in out.iterdir() if e.name[0] in "hm" and e.name[1:].isdigit()]
    options = FitOptions(spans=SPANS, fold=True, bias=True, holdout=HOLDOUT, source="moments")
    fits = fit_spans(out, options)
    reference = Store.open(mlp_store)  # the same 48 digits, with their activations
    fit_idx, held_idx = split_holdout(np.arange(reference.layout.n_samples), HOLDOUT, 0)
    for fit in fits:
        t, c = _lstsq(*_folded_xy(reference, fit.span, fit_idx))
        assert np.abs(fit.solution.t - t).max() <= 1e-8 * np.abs(t).max()
        assert np.abs(fit.solution.bias - c).max() <= 1e-8 * np.abs(c).max()
        x_held, y_held = _folded_xy(reference, fit.span, held_idx)
        sse = float(((x_held @ t + c - y_held) ** 2).sum())
        relative = fit.diagnostics["heldout"]["relative_mse"]
        assert relative == pytest.approx(sse / (y_held**2).sum(), rel=1e-7)


def test_class_token_store_fits_folded_maps_only_from_the_moments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Block a needs every token of h(a-1): a --tokens cls store cannot recompute it, but its
    stored m_a (class token) and moments give the folded fit."""
    store = _mlp_store(tmp_path / "cls.zarr", limit=160, tokens="cls")  # 160 rows, 64 channels
    code, _, err = run_cli(capsys, "fit", store.path, "--span", "3:6", "--fold")
    assert code == 2 and "--mlp-outputs and run stats" in err and "\n" not in err.strip()
    all_idx = np.arange(store.layout.n_samples)
    x, y = _folded_xy(store, (3, 6), all_idx)
    code, _, err = run_cli(capsys, "stats", store.path, "--tokens", "cls")
    assert code == 0, err
    _move_activations_away(store.path, tmp_path / "away")
    options = FitOptions(spans=((3, 6),), fold=True, bias=True, tokens="cls", source="moments")
    fit = fit_spans(store.path, options)[0]
    t, c = _lstsq(x, y)
    assert np.abs(fit.solution.t - t).max() <= 1e-8 * np.abs(t).max()
    assert np.abs(fit.solution.bias - c).max() <= 1e-8 * max(np.abs(c).max(), 1e-12)


def test_llama_folded_fit_from_the_moments_equals_lstsq(
    lm: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    store = _extract(lm, "llama", tmp_path / "llama.zarr", mlp_outputs=True)
    assert store.holds_mlp_outputs and len(store.layout.mlp_points) == store.layout.n_blocks
    module = rebuild_model(store.description["model"], None, store).module
    h1 = torch.from_numpy(store.point(1)[:4])
    _, m = MlpOutputs(module, 2, h1.shape[1])(h1)
    assert np.abs(store.array("m2")[:4] - m.numpy()).max() < 1e-5
    store = Store.open(store.path, "r+")
    store.write_analysis(STATS, "all", compute_block_stats(store).to_dataset())
    span = (2, 4)
    x, y = _folded_xy(store, span, np.arange(store.layout.n_samples))
    fit = fit_spans(store, FitOptions(spans=(span,), fold=True, source="moments"))[0]
    assert fit.diagnostics["source"]["kind"] == "moments"
    t = np.linalg.lstsq(x, y, rcond=None)[0]  # no --bias: through the origin
    assert np.abs(fit.solution.t - t).max() <= 1e-8 * np.abs(t).max()


def test_what_cannot_give_folded_moments_is_refused_in_one_line(
    small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "plain.zarr"
    shutil.copytree(small_store, copy)
    assert run_cli(capsys, "stats", copy)[0] == 0
    code, _, err = run_cli(capsys, "fit", copy, "--span", "3:5", "--fold", "--from", "moments")
    assert code == 2 and "do not cover block 3's MLP output" in err
    assert "--mlp-outputs" in err and "\n" not in err.strip()
    code, _, err = run_cli(
        capsys, "extract", "--model", "test_resnet", "--mlp-outputs", "--limit", 3,
        "--out", tmp_path / "r.zarr",
    )  # fmt: skip
    assert code != 0 and "--mlp-outputs" in err and "drop --mlp-outputs" in err
    assert "\n" not in err.strip() and not (tmp_path / "r.zarr").exists()


def test_dry_run_counts_the_mlp_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["extract", "--limit", 40, "--out", tmp_path / "s.zarr", "--dry-run"]
    code, plain, _ = run_cli(capsys, *args)
    code_mlp, with_mlp, err = run_cli(capsys, *args, "--mlp-outputs")
    assert code == code_mlp == 0, err
    assert "h0..h12 and m1..m12 (MLP outputs)" in with_mlp and "m1..m12" not in plain

    def raw(out: str) -> float:  # "activations X MiB raw"
        return float(out.split("activations ")[1].split(" MiB raw")[0])

    assert raw(with_mlp) == pytest.approx(raw(plain) * 25 / 13, rel=1e-2)  # 12 more arrays
    assert not (tmp_path / "s.zarr").exists()
