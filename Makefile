# cpl-cache: every target that needs Python makes the .venv first.
# torch==2.13.0 is installed before the package so a CPU machine does not pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/cpl-cache
STAMP := $(VENV)/.installed-stamp
TORCH_SPEC ?= torch==2.13.0

# The tests and the demo never touch the network; the real run may download checkpoints.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install test lint demo readme-demo bench-cache bench-train bench-table bench-regret bench-extract reproduce-table2 reproduce-table6 clean

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv with torch (CPU build here) and the package with its dev extra

test: $(STAMP) ## Run the test suite (offline, CPU)
	$(OFFLINE) $(PY) -m pytest -q tests

lint: $(STAMP) ## ruff check and format check
	$(VENV)/bin/ruff check cpl_cache tests benchmarks
	$(VENV)/bin/ruff format --check cpl_cache tests benchmarks

DEMO_DIR ?= demo
# How each trained cell's step size and stopping point are chosen: hold (default), weak or none.
SELECT ?= hold

demo: $(STAMP) ## The main job on built-in synthetic data and tiny models: synth, train-weak, extract, the grid, table, plot
	$(OFFLINE) $(PY) -m cpl_cache demo --out $(DEMO_DIR) --select $(SELECT)

readme-demo: demo ## Splice the demo's own table (demo/results/demo.md) into README.md
	$(PY) -c 'import pathlib; t = pathlib.Path("$(DEMO_DIR)/results/demo.md").read_text(); \
	r = pathlib.Path("README.md"); s = r.read_text(); a, b = "<!-- demo-table -->", "<!-- /demo-table -->"; \
	r.write_text(s[: s.index(a) + len(a)] + "\n" + t.strip() + "\n" + s[s.index(b) :])'

bench-cache: $(STAMP) ## Cache write/load benchmark against a flat numpy file (writes bench-results/cache.json)
	$(OFFLINE) $(PY) benchmarks/bench_cache.py

bench-train: $(STAMP) ## Stage-two benchmark: the Table 2 grid under the default protocol beside the fixed values in fp32, naive-lp against a DataLoader loop, bf16 against fp32 on the zoo, what halving gives up, the planted LDA figures, the mixture cache's table, the *-tp epochs (bench-results/train.json, precision.json, halving.json, planted-lda.json, mixture.json, prompt.json)
	$(OFFLINE) $(PY) benchmarks/bench_train.py --parts grid,reference --no-alone
	$(OFFLINE) $(PY) benchmarks/bench_precision.py
	$(OFFLINE) $(PY) benchmarks/bench_halving.py
	$(OFFLINE) $(PY) benchmarks/planted_lda.py
	$(OFFLINE) $(PY) benchmarks/mixture_table.py
	$(OFFLINE) $(PY) benchmarks/bench_prompt.py

bench-table: $(STAMP) ## The planted table at the fixed values: the grid's stacks only, three seeds, fp32 (bench-results/train-table.json)
	$(OFFLINE) $(PY) benchmarks/bench_train.py --parts grid --no-alone --no-anchor --select none --precision fp32 --json bench-results/train-table.json

bench-regret: $(STAMP) ## Tuning regret of every Table 2 method on the zoo of caches, per selection protocol, and what hold costs against none (bench-results/regret.json, select-cost.json)
	$(OFFLINE) $(CLI) bench-regret --out bench-results/regret.json
	$(OFFLINE) $(PY) benchmarks/select_cost.py --json bench-results/select-cost.json

bench-extract: $(STAMP) ## Stage-one benchmark: decode, forward, whole extract (writes bench-results/extract.json)
	$(OFFLINE) $(PY) benchmarks/bench_extract.py

DATA_ROOT ?= data/domainnet
STRONG ?= openai/clip-vit-base-patch32
WEAK ?= microsoft/resnet-18
DEVICE ?= auto
CACHE_DIR ?= cache
RESULTS ?= results
WEAK_DIR ?= checkpoints/weak

reproduce-table2: $(STAMP) ## Table 2 from DomainNet: train-weak and extract where missing, the grid, table, plots
	$(CLI) reproduce pipelines/table2.toml --data-root $(DATA_ROOT) \
		--strong $(STRONG) --weak-model $(WEAK) --weak-dir $(WEAK_DIR) --cache-dir $(CACHE_DIR) \
		--results $(RESULTS) --device $(DEVICE) --select $(SELECT)

OFFICEHOME_ROOT ?= data/officehome
OFFICEHOME_CACHE_DIR ?= cache-officehome
OFFICEHOME_RESULTS ?= results-officehome
OFFICEHOME_WEAK_DIR ?= checkpoints/weak-officehome

# Office-Home gets its own cache, results and checkpoints: its "Clipart" and DomainNet's "clipart"
# would share one folder on a case-insensitive file system, and one table per results folder.
reproduce-table6: $(STAMP) ## Table 6 from Office-Home: train-weak and extract where missing, the grid, table, plots
	$(CLI) reproduce pipelines/table6.toml --dataset officehome --data-root "$(OFFICEHOME_ROOT)" \
		--strong $(STRONG) --weak-model $(WEAK) --weak-dir "$(OFFICEHOME_WEAK_DIR)" \
		--cache-dir "$(OFFICEHOME_CACHE_DIR)" --results "$(OFFICEHOME_RESULTS)" --device $(DEVICE) \
		--select $(SELECT)

clean: ## Remove the venv and generated outputs
	rm -rf $(VENV) $(DEMO_DIR) bench-out
