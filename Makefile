# The two set-up commands: `make demo` runs the pipeline end to end, `make test` runs the tests.
# Each creates or updates the virtual environment .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(VENV)/bin/tinyllama demo

test: venv
	$(PY) -m pytest -q
