"""The README's results block is what the shipped weights give (``make results``), and it shows
what issue 12 asks of the selection."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make_results():  # docs/make_results.py is a script, not a package module
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "docs" / "make_results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_readme_results_block_is_what_the_shipped_weights_give(tmp_path: Path) -> None:
    make_results = _make_results()
    figures = make_results.measure(tmp_path)
    block = make_results.render(figures)
    committed = make_results.current_block((ROOT / "README.md").read_text())
    assert committed == block, "the README's results block is stale: run 'make results'"

    selection, report = figures["runs"]["select"]
    rows = {v["name"]: v for v in report["variants"]}
    original = rows["original"]["accuracy"]
    assert original >= 0.95
    removed = selection.steps[-1].blocks_removed
    assert removed >= 3
    assert rows[f"selected -{removed}"]["accuracy"] >= original - 0.015
    for step in selection.steps:  # linear maps at least as good as dropping the same spans
        k = step.blocks_removed
        assert rows[f"selected -{k}"]["accuracy"] >= rows[f"identity -{k}"]["accuracy"]
    assert rows[f"selected -{removed}"]["accuracy"] > rows[f"identity -{removed}"]["accuracy"]
    _, identity_report = figures["runs"]["identity"]  # the greedy with identity maps
    identity_rows = {v["name"]: v for v in identity_report["variants"]}
    if f"selected -{removed}" in identity_rows:
        assert (
            rows[f"selected -{removed}"]["accuracy"]
            > identity_rows[f"selected -{removed}"]["accuracy"]
        )
    assert selection.val_samples == 360 and report["test_samples"] == 360


@pytest.mark.slow
def test_the_readme_language_block_is_what_the_shipped_model_gives(tmp_path: Path) -> None:
    """Issue 19, item 5: on the embedded language model, select removes at least one layer
    within --max-drop 1 and --max-ppl-increase 0.05, and the linear maps beat dropping."""
    make_results = _make_results()
    figures = make_results.measure_lm(tmp_path)
    block = make_results.render_lm(figures)
    text = (ROOT / "README.md").read_text()
    committed = make_results.current_block(text, make_results.LM_BEGIN, make_results.LM_END)
    assert committed == block, "the README's lm-results block is stale: run 'make results'"

    selection, report = figures["runs"]["select"]
    assert selection.options.max_drop == 1 and selection.options.max_ppl_increase == 0.05
    assert selection.steps, selection.stop_reason
    rows = {v["name"]: v for v in report["variants"]}
    base = selection.original_val_perplexity
    for step in selection.steps:  # within the limits on the split that chose them
        assert step.val_perplexity <= base * 1.05
        assert step.val_accuracy >= selection.original_val_accuracy - 0.01
        k = step.blocks_removed
        assert rows[f"selected -{k}"]["perplexity"] < rows[f"identity -{k}"]["perplexity"]
    assert report["test_windows"] == 182 and selection.val_samples == 143
