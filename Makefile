# The two set-up commands: `make demo` runs the pipeline end to end, `make test` runs the tests.
# Each creates or updates the virtual environment .venv first.
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the tests drive for real: a browser for the Prefect UI test, PostgreSQL for
# Prefect on PostgreSQL.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test venv system-deps
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

system-deps:
	@command -v chromium >/dev/null && test -x /usr/lib/postgresql/15/bin/initdb || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium postgresql; }

demo: venv
	$(VENV)/bin/tinyllama demo

test: venv system-deps
	$(PY) -m pytest -q -n 2 --dist loadfile
