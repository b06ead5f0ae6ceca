# One-command set-up. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export DO_NOT_TRACK = 1
export NO_PROXY = 127.0.0.1,localhost
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# Torch first (pinned, taken from this machine's disk), then open-flamingo without its torch 2.0.1 pin,
# then the project with everything else under the same constraints.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q --no-deps open-flamingo==2.0.1
	$(PIP) install -q -c constraints.txt -e '.[dev,ray]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/polite run

test: setup
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/ingest.py
	$(PY) bench/distort.py
	$(PY) bench/filters.py
	$(PY) bench/train_tiny.py
	$(PY) bench/orchestration.py

clean:
	rm -rf workspace .pytest_cache
