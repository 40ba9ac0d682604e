# glancefs: `make demo` to try it, `make test` to check it. Each target installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := fuse3 libfuse3-dev pkg-config qemu-utils rsync attr curl genisoimage fio haproxy postgresql
DEMO_DIR := .demo
PYTEST_ARGS ?=

.PHONY: all deps venv lab lab-glance lint types unit integration test demo demo-stop bench clean

all: test

# System packages: libfuse3 to build pyfuse3 and mount, qemu-img/rsync/getfattr for the tests,
# haproxy and postgresql for the production lab (lab.production).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "make: installing" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The pinned Glance (and Keystone, for the auth tests) in cached virtualenvs under .cache/lab.
lab: venv
	@$(PY) -m lab venvs --keystone >/dev/null

lab-glance: venv
	@$(PY) -m lab venvs >/dev/null

lint: venv
	$(VENV)/bin/ruff check glancefs tests lab bench
	$(VENV)/bin/ruff format --check glancefs tests lab bench
	$(VENV)/bin/lint-imports --no-cache

# The tests are strict too, but for bare generics: a bare `dict` there is one of Glance's JSON
# records as it arrives. (A run of their own: their modules are top-level names, not a package.)
types: venv
	$(VENV)/bin/mypy glancefs lab bench
	$(VENV)/bin/mypy --allow-any-generics tests

unit: venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

integration: lab
	$(PY) -m pytest -q tests/integration tests/lab $(PYTEST_ARGS)

test: lint types lab
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: lab-glance
	@$(PY) -m lab.demo start --dir $(DEMO_DIR) --mountpoint mnt

demo-stop: venv
	@$(PY) -m lab.demo stop --dir $(DEMO_DIR) --mountpoint mnt

bench: lab
	$(PY) -m bench

clean:
	@if [ -x $(PY) ]; then $(PY) -m lab.demo stop --dir $(DEMO_DIR) --mountpoint mnt; fi
	rm -rf $(VENV) .cache $(DEMO_DIR) .mypy_cache .ruff_cache .pytest_cache
