# Two commands on a fresh machine:  `make demo` (set up, run the main job)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo demo-lm test lint bench bench-full results

$(BIN)/rba-store: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU build (an unpinned torch pulls GBs of CUDA packages)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/rba-store

demo: setup  ## the main job on the embedded default: extract -> stats -> fit -> evaluate -> select
	$(BIN)/rba-store extract --out runs/demo.zarr --overwrite
	$(BIN)/rba-store info runs/demo.zarr
	$(BIN)/rba-store stats runs/demo.zarr --plots runs/demo-plots
	$(BIN)/rba-store fit runs/demo.zarr --auto 3 --holdout 0.2 --name demo --overwrite
	$(BIN)/rba-store evaluate runs/demo.zarr --auto --plots runs/demo-plots
	$(BIN)/rba-store select runs/demo.zarr --plots runs/demo-plots

demo-lm: setup  ## the same on the embedded language model: extract -> stats -> fit -> select -> apply
	$(BIN)/rba-store extract --model rba-stdlib-lm --limit 128 --out runs/lm.zarr --overwrite
	$(BIN)/rba-store stats runs/lm.zarr
	$(BIN)/rba-store fit runs/lm.zarr --auto 3 --holdout 0.1 --name lm --overwrite
	$(BIN)/rba-store select runs/lm.zarr --max-drop 1 --max-ppl-increase 0.05 --batch-size 32
	$(BIN)/rba-store apply runs/lm.zarr --selection runs/lm.select.json --out runs/lm-model --overwrite

results: setup  ## re-generate the README's results block from the shipped weights
	$(BIN)/python docs/make_results.py

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check rba_store tests benchmarks
	$(BIN)/ruff format --check rba_store tests benchmarks

bench: setup  ## the benchmark suite, quick sizes (a few minutes); rewrites benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks --json benchmarks/results.json

bench-full: setup  ## the same at full sizes (tens of minutes, a 6 GB scratch store)
	$(BIN)/python -m benchmarks --full --json benchmarks/results.json
