"""Span selection by measurement: the greedy's choices against full forward passes, re-fitted
maps against lstsq, the selection file through apply, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rba_store.approx import SpanMap, replace_spans
from rba_store.approx.network import SplitNetwork
from rba_store.approx.recipe import load_approximated
from rba_store.approx.refit import refit_maps
from rba_store.approx.select import SelectOptions, candidate_spans, original_maps, select_spans
from rba_store.extract.data import DigitsSource, make_preprocess
from rba_store.extract.default_model import DATA_CONFIG
from rba_store.extract.models import build_model
from rba_store.store import Store
from tests.conftest import tree_digest
from tests.test_approx import run_cli


@pytest.fixture(scope="module")
def select_store(tmp_path_factory: pytest.TempPathFactory, small_store: Path) -> Path:
    """A copy of the small store (50 digits) for the selections of this module."""
    return Path(shutil.copytree(small_store, tmp_path_factory.mktemp("select") / "s.zarr"))


def _images(split: str) -> tuple[torch.Tensor, np.ndarray]:
    source = DigitsSource(split)
    return source.load(0, len(source), make_preprocess(dict(DATA_CONFIG))), source.labels


def _predict(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).argmax(1).numpy()


def test_first_step_is_the_best_candidate_by_full_forward_passes(select_store: Path) -> None:
    """The greedy's shortcut (start at h_a, run only what follows b) chooses what whole-model
    forward passes of every candidate would choose."""
    store = Store.open(select_store)
    options = SelectOptions(max_blocks=1)
    selection = select_spans(store, options)
    model = build_model(None).module
    x, labels = _images("val")
    original = _predict(model, x)
    maps = original_maps(store, candidate_spans(store, options))
    scores = {}
    for span, span_map in maps.items():
        predicted = _predict(replace_spans(model, [span_map]), x)
        scores[span] = (
            float((predicted == original).mean()),
            float((predicted == labels).mean()),
            span[1] - span[0],
        )
    best = max(scores, key=lambda s: scores[s])
    assert [s.span for s in selection.steps] == [best]
    agreement, accuracy, _ = scores[best]
    assert selection.steps[0].val_agreement == pytest.approx(agreement, abs=1e-12)
    assert selection.steps[0].val_accuracy == pytest.approx(accuracy, abs=1e-12)
    assert selection.original_val_accuracy == pytest.approx(float((original == labels).mean()))
    assert "--max-blocks 1" in selection.stop_reason


def test_split_network_equals_the_surgically_replaced_model(select_store: Path) -> None:
    model = build_model(None).module
    rng = np.random.default_rng(0)
    maps = [SpanMap((2, 4), np.eye(64) + 0.01 * rng.normal(size=(64, 64))), SpanMap((7, 8))]
    net = SplitNetwork(model, maps)
    x, _ = _images("test")
    points = net.all_points(net.stem(x[:40]))
    assert sorted(points) == net.points() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    with torch.inference_mode():
        whole = replace_spans(model, maps)(x[:40])
    torch.testing.assert_close(net.features(points[12], pre_logits=False), whole)
    torch.testing.assert_close(net.features(net.run(points[4], 4), False), whole)


def test_refitted_maps_equal_lstsq_on_the_current_network(select_store: Path) -> None:
    store = Store.open(select_store)
    chosen = original_maps(store, [(2, 3)])[(2, 3)]
    net = SplitNetwork(build_model(None).module, [chosen])
    refitted = refit_maps(store, net, [(4, 6), (4, 5)])
    h2 = torch.from_numpy(store.point(2)[:])
    with torch.inference_mode():  # the current network from h2: the map, then block 4
        x = net.model.blocks[3](chosen.module()(h2)).numpy().reshape(-1, 64).astype(np.float64)
    for b in (5, 6):
        y = store.point(b)[:].reshape(-1, 64).astype(np.float64)
        reference = np.linalg.lstsq(x, y, rcond=None)[0]
        span_map, solution = refitted[(4, b)]
        np.testing.assert_allclose(span_map.t, reference, rtol=0, atol=1e-6)
        assert solution.n_rows == x.shape[0]


def test_select_cli_writes_a_selection_that_apply_reproduces(
    select_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "choice.json"
    code, stdout, err = run_cli(
        capsys,
        "select",
        select_store,
        "--max-blocks",
        "2",
        "--out",
        out,
        "--json",
        "--plots",
        tmp_path / "plots",
        "--refit",
        "--name",
        "sel",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert len(report["steps"]) >= 1 and report["val_samples"] == 360
    assert report["test"]["test_samples"] == 360
    assert (tmp_path / "plots" / "select.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(out.read_text())
    assert [s["span"] for s in saved["spans"]] == [s["span"] for s in report["steps"]]
    removed = report["steps"][-1]["blocks_removed"]
    claimed = {v["name"]: v for v in report["test"]["variants"]}[f"selected -{removed}"]
    code, _, err = run_cli(
        capsys, "apply", select_store, "--selection", out, "--out", tmp_path / "model"
    )
    assert code == 0, err
    x, labels = _images("test")
    accuracy = float((_predict(load_approximated(tmp_path / "model"), x) == labels).mean())
    assert accuracy == pytest.approx(claimed["accuracy"], abs=1e-12)
    assert set(DigitsSource("val").sample_ids).isdisjoint(DigitsSource("test").sample_ids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-drop", "-1"], "--max-drop -1.0 is out of range"),
        (["--max-blocks", "12"], "--max-blocks 12 is out of range; pass 1..11"),
        (["--maps", "identity", "--refit"], "--refit needs linear maps"),
        (["--name", "bad name"], "name 'bad name' is not valid"),
        (["--candidates", "0"], "--candidates 0 is invalid"),
    ],
)
def test_bad_select_options_are_refused_in_one_line(
    select_store: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    before = tree_digest(select_store)
    code, _, err = run_cli(capsys, "select", select_store, *args)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert tree_digest(select_store) == before


def test_a_selection_of_another_store_is_refused(
    select_store: Path, small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"spans": [], "store_fingerprint": "0" * 64}))
    code, _, err = run_cli(
        capsys, "apply", select_store, "--selection", other, "--out", tmp_path / "m"
    )
    assert code == 2 and "was made on another store" in err
