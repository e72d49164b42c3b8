"""The figures: CKA colour scale follows the data, labelled log ticks, a readable sweep plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from rba_store.approx.sweep import write_sweep_plot
from rba_store.stats import compute_block_stats
from rba_store.stats.plots import block_change_figure, cka_figure, write_plots
from rba_store.stats.result import BlockStats

PNG = b"\x89PNG\r\n\x1a\n"


def synthetic_stats(cka: np.ndarray, relative_change: np.ndarray) -> BlockStats:
    n_blocks = len(relative_change)
    return BlockStats(
        br=-relative_change,
        relative_change=relative_change,
        cosine=1 - relative_change / 3,
        norm=np.ones(n_blocks + 1),
        cka=cka,
        span_change=np.zeros((n_blocks + 1, n_blocks + 1)),
        n_samples=10,
        n_rows=170,
        attrs={"tokens": "all"},
    )


def labelled_ticks(ax) -> list[str]:  # type: ignore[no-untyped-def]
    """The y tick labels drawn inside the axis's range."""
    ax.figure.canvas.draw()
    low, high = ax.get_ylim()
    return [
        t.get_text()
        for t, v in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)
        if t.get_text() and low <= v <= high
    ]


def test_cka_colour_scale_spans_the_data_and_shows_nan(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cka = 0.99 + 0.01 * rng.random((5, 5))
    cka = (cka + cka.T) / 2
    np.fill_diagonal(cka, 1.0)
    cka[1, 3] = np.nan
    fig = cka_figure(synthetic_stats(cka, np.array([0.1, 0.2, 0.3, 0.4])))
    assert fig is not None
    image = fig.axes[0].images[0]
    low, high = image.get_clim()
    assert (low, high) == (np.nanmin(cka), 1.0) and low > 0.99  # not (0, 1)
    assert np.ma.is_masked(image.get_array()[1, 3])  # the NaN cell takes the 'bad' colour
    assert tuple(image.get_cmap().get_bad()) != tuple(image.get_cmap()(0.0))
    colorbar_label = fig.axes[1].get_ylabel()
    assert "(range 0.990" in colorbar_label and "NaN (1 cells)" in colorbar_label
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[1].get_yticklabels() if t.get_text()]
    assert len(set(ticks)) >= 4  # distinct labels, not one rounded value
    assert cka_figure(synthetic_stats(np.full((5, 5), np.nan), np.ones(4))) is None


@pytest.mark.parametrize("decades", [0.3, 2.0, 6.0])
def test_log_axis_has_enough_labelled_ticks(decades: float) -> None:
    change = np.logspace(-3, -3 + decades, 12)
    fig = block_change_figure(synthetic_stats(np.eye(13), change))
    ax_rel = fig.axes[1]
    assert ax_rel.get_yscale() == "log"
    assert len(labelled_ticks(ax_rel)) >= 4


def test_plots_of_a_real_store(small_store: Path, tmp_path: Path) -> None:
    stats = compute_block_stats(small_store)
    fig = cka_figure(stats)
    assert fig is not None
    finite = stats.cka[np.isfinite(stats.cka)]
    assert fig.axes[0].images[0].get_clim() == (finite.min(), finite.max())
    assert len(labelled_ticks(block_change_figure(stats).axes[1])) >= 4
    for path in write_plots(stats, tmp_path / "plots"):
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 10_000


def sweep_report() -> dict:  # type: ignore[type-arg]
    variants = [{"name": "original", "accuracy": 0.973, "params": 5.0e6}]
    linear = [0.971, 0.965, 0.95, 0.90]
    identity = [0.971, 0.93, 0.40, 0.10]  # k=1 equal to linear; k=3, 4 far below
    for k, (lin, ide) in enumerate(zip(linear, identity, strict=True), start=1):
        variants.append({"name": f"linear -{k}", "accuracy": lin, "params": 5e6 - k * 3e5})
        variants.append({"name": f"identity -{k}", "accuracy": ide, "params": 5e6 - k * 4e5})
    return {"variants": variants}


def test_sweep_plot_keeps_every_series_and_reference_visible(tmp_path: Path) -> None:
    fig = Figure(figsize=(15, 4))
    path = write_sweep_plot(sweep_report(), tmp_path / "sweep.png", title="t", fig=fig)
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    ax_acc = fig.axes[1]  # accuracy near the original (fig.axes[0] holds every value)
    lines = {line.get_label(): line for line in ax_acc.get_lines()}
    linear, identity = lines["fitted linear map T"], lines["identity (drop blocks)"]
    assert linear.get_marker() != identity.get_marker()
    # the identity squares are larger and hollow, drawn below the linear circles
    assert identity.get_markersize() > linear.get_markersize()
    assert identity.get_markerfacecolor() == "none"
    assert linear.get_zorder() > identity.get_zorder()
    original, minus_one = lines["original (97.3%)"], lines["original - 1 pt"]
    assert original.get_linestyle() != minus_one.get_linestyle()
    assert original.get_color() != minus_one.get_color()
    # the y-range keeps the 1-pt gap at least 2 % of the axis height
    low, high = ax_acc.get_ylim()
    assert 1 / (high - low) >= 0.02 and low < 97.3 - 1 < 97.3 < high
    # and the first panel holds every value (tests/test_new_commands_usability.py, item 11)
