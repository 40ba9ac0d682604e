# glancefs: `make demo` to try it, `make test` to check it, `make install` to use it. Each target
# installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := fuse3 libfuse3-dev pkg-config qemu-utils rsync attr curl genisoimage fio haproxy postgresql \
	ceph-mon ceph-osd ceph-common python3-rbd python3-rados
DEMO_DIR := .demo
PYTEST_ARGS ?=

# make install: as root, a virtualenv in /opt/glancefs, `glancefs` linked into /usr/local/bin, the
# man page, bash completion and the systemd unit; PREFIX=$HOME/.local for a user install.
PREFIX ?= /usr/local
ifeq ($(PREFIX),/usr/local)
LIBDIR ?= /opt/glancefs
COMPLETIONDIR ?= /usr/share/bash-completion/completions
UNITDIR ?= /usr/local/lib/systemd/system
else
LIBDIR ?= $(PREFIX)/lib/glancefs
COMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions
# A system unit with a user's PREFIX would run a binary only that user may own: none then.
UNITDIR ?=
endif
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man/man1
#: What glancefs itself needs: libfuse3 to mount (and to build pyfuse3), venv to install into.
RUNTIME_PACKAGES := fuse3 libfuse3-dev pkg-config python3-venv

.PHONY: all deps venv lab lab-glance lint types unit integration test demo demo-stop bench clean \
	install uninstall soak

all: test

# System packages: libfuse3 to build pyfuse3 and mount, qemu-img/rsync/getfattr for the tests,
# haproxy and postgresql for the production lab (lab.production), Ceph (a one-node cluster and
# the python3-rados/rbd bindings Glance's rbd store loads) for lab.ceph.
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

# The pinned Glance (and Keystone and Swift, for the auth and store tests) in cached virtualenvs
# under .cache/lab.
lab: venv
	@$(PY) -m lab venvs --keystone --swift >/dev/null

lab-glance: venv
	@$(PY) -m lab venvs >/dev/null

# lab.doccheck: the docs name modules and attributes that exist, and ARCHITECTURE.md's picture
# shows the layers of pyproject.toml's contracts.
lint: venv
	$(VENV)/bin/ruff check glancefs tests lab bench
	$(VENV)/bin/ruff format --check glancefs tests lab bench
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m lab.doccheck

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

install: APT_PACKAGES := $(RUNTIME_PACKAGES)
install: deps
	$(PYTHON) -m venv $(LIBDIR)
	$(LIBDIR)/bin/pip install -q --upgrade pip
	$(LIBDIR)/bin/pip install -q --upgrade .
	install -d $(BINDIR) $(MANDIR) $(COMPLETIONDIR)
	ln -sfn $(LIBDIR)/bin/glancefs $(BINDIR)/glancefs
	$(LIBDIR)/bin/python -m glancefs.manpage > $(MANDIR)/glancefs.1
	_GLANCEFS_COMPLETE=bash_source $(LIBDIR)/bin/glancefs > $(COMPLETIONDIR)/glancefs
	@if [ -n "$(UNITDIR)" ]; then \
	  install -d $(UNITDIR) && \
	  sed 's|/usr/local/bin/glancefs|$(BINDIR)/glancefs|' contrib/systemd/glancefs@.service \
	    > $(UNITDIR)/glancefs@.service; \
	  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi
	@echo "glancefs $$($(BINDIR)/glancefs --version | cut -d' ' -f3) installed: $(BINDIR)/glancefs" \
	  "(man glancefs; glancefs status)"

uninstall:
	rm -f $(MANDIR)/glancefs.1 $(COMPLETIONDIR)/glancefs
	@if [ -n "$(UNITDIR)" ]; then rm -f $(UNITDIR)/glancefs@.service; fi
	@# Only what make install made: the link into LIBDIR and a virtualenv.
	@if [ "$$(readlink $(BINDIR)/glancefs)" = "$(LIBDIR)/bin/glancefs" ]; then \
	  rm -f $(BINDIR)/glancefs; fi
	@if [ -f $(LIBDIR)/pyvenv.cfg ]; then rm -rf $(LIBDIR); fi

bench: lab
	$(PY) -m bench

# Ten minutes of mixed load on the production lab through 5 % faults; figures into RELIABILITY.md.
SOAK_ARGS ?=
soak: lab
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	@if [ -x $(PY) ]; then $(PY) -m lab.demo stop --dir $(DEMO_DIR) --mountpoint mnt; fi
	rm -rf $(VENV) .cache $(DEMO_DIR) .mypy_cache .ruff_cache .pytest_cache
