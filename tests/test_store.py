"""The Store handle: opened once per command, old stores still open, the package's shape."""

from __future__ import annotations

import ast
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from dask.base import tokenize

from rba_store.cli import main
from rba_store.errors import NotFoundError
from rba_store.store import FITS, STATS, Store

DATA = Path(__file__).parent / "data"
PACKAGE = Path(__file__).parents[1] / "rba_store"


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    """A copy of the store written before the restructuring (never modify the original)."""
    return Path(shutil.copytree(DATA / "format-v1-store", tmp_path / "old.zarr"))


def test_a_store_written_before_the_restructuring_opens_and_reads(old_store: Path) -> None:
    store = Store.open(old_store)
    assert store.layout.n_samples == 12 and store.layout.n_blocks == 2
    assert store.completed_shards().tolist() == [True, True, True]
    assert store.list_analyses(STATS) == ["tokens-all"] and store.list_analyses(FITS) == ["0-2"]
    saved = store.read_analysis(FITS, "0-2")
    assert saved is not None and saved["T"].shape == (4, 4)
    # a fresh fit of the same span from the old arrays gives the saved T
    assert main(["fit", str(old_store), "--span", "0:2", "--name", "again"]) == 0
    again = Store.open(old_store).read_analysis(FITS, "again")
    np.testing.assert_allclose(again["T"].values, saved["T"].values, rtol=0, atol=1e-12)
    h = zarr.open_group(str(old_store), mode="r", use_consolidated=False)
    x = h["h0"][:].reshape(-1, 4).astype(np.float64)
    y = h["h2"][:].reshape(-1, 4).astype(np.float64)
    reference = np.linalg.lstsq(x, y, rcond=None)[0]
    np.testing.assert_allclose(saved["T"].values, reference, rtol=0, atol=1e-8)
    assert main(["validate", str(old_store)]) == 0
    assert xr.open_zarr(old_store)["h1"].shape == (12, 3, 4)


def test_fit_opens_the_store_once(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Path(shutil.copytree(small_store, tmp_path / "count.zarr"))
    opened: list[str] = []
    real = zarr.open_group

    def counting(*args: object, **kwargs: object) -> object:
        opened.append(str(args[0] if args else kwargs.get("store")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zarr, "open_group", counting)
    assert Store.open(store).layout.n_shards == 3  # several shard tasks, one handle
    opened.clear()
    assert main(["fit", str(store), "--span", "3:6"]) == 0
    assert opened.count(str(store)) == 1, opened
    assert Store.open(store).has_analysis(FITS, "3-6")


def test_the_handle_coerces_pickles_and_tokenizes(small_store: Path) -> None:
    store = Store.open(small_store)
    assert Store.coerce(store) is store
    assert Store.coerce(small_store).fingerprint == store.fingerprint
    copy = pickle.loads(pickle.dumps(store))  # what a Dask worker gets: reopened by path
    assert copy.fingerprint == store.fingerprint and copy.mode == "r"
    assert tokenize(store) == tokenize(Store.open(small_store))
    np.testing.assert_array_equal(copy.point(3)[:5], store.point(3)[:5])
    with pytest.raises(NotFoundError, match="does not exist"):
        Store.open(small_store.parent / "missing.zarr")


# -- the package's shape ----------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def test_no_module_is_over_450_lines_and_the_cli_is_a_package() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 450}
    assert not long
    assert (PACKAGE / "cli" / "__init__.py").is_file()


def test_exactly_one_module_imports_cupy() -> None:
    imports = re.compile(r"^\s*(import cupy|from cupy\b)|import_module\([\"']cupy", re.M)
    naming = [m for m, p in _modules().items() if imports.search(p.read_text())]
    assert naming == ["rba_store.solve._backend"]


def test_no_import_cycles_at_module_level() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are fine
            if isinstance(node, ast.ImportFrom) and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in modules] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail, node, dep]))
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
