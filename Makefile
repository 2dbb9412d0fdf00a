# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv and install stm with what its tests need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench samples clean

# setup.py and rust/ build the optional accelerator (stm._accel): rebuild it when they change.
$(STAMP): pyproject.toml setup.py rust/Cargo.toml rust/Cargo.lock $(wildcard rust/src/*.rs)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m stm.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m bench all

samples: $(STAMP)
	$(PY) samples/make_samples.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
