"""The README's equal-bytes table (``python docs/token_budget.py``) is what the code gives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_readme_token_budget_block_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("token_budget", ROOT / "docs" / "token_budget.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure(tmp_path)
    text = (ROOT / "README.md").read_text()
    committed = text[text.index(module.BEGIN) : text.index(module.END) + len(module.END)]
    assert committed == module.render(rows), "stale: run 'python docs/token_budget.py'"
    for row in rows:  # equal bytes: the same number of stored token vectors, within one image
        case = row["case"]
        assert abs(row["all"][1] - row["random"][1]) <= case["k"] + 1
