# pcisplit developer targets. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSPKGS := pciutils pci.ids fuse3 libfuse3-dev pkg-config

.PHONY: install shellfiles sysdeps peers vm-image vm demo test lint typecheck bench fuzz dist clean

install: sysdeps $(STAMP) shellfiles

# Man pages and bash/zsh completion from the parsers, into $(VENV)/share (docs/cli.md).
shellfiles: $(STAMP)
	@$(PY) tools/shell_files.py --out $(VENV)/share >/dev/null

# System packages: installed through apt-get when run as root; otherwise we say what is missing.
sysdeps:
	@missing=""; for p in $(SYSPKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null || \
	      { echo "apt-get install of$$missing failed" >&2; exit 1; }; \
	  else echo "warning: missing system packages:$$missing (install them as root; lspci tests will skip)" >&2; fi; \
	fi

$(STAMP): pyproject.toml setup.py shared/ring/_build.py shared/ring/ring.h \
          shared/evtchn/_build.py shared/evtchn/guard.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,mount,shell]'
	@# atheris (extra 'fuzz') has wheels for CPython <= 3.11 on x86_64 Linux and otherwise
	@# needs clang; where it cannot be installed the fuzz smoke tests skip and say why.
	$(PY) -m pip install -q -e '.[fuzz]' || \
	  echo "warning: atheris (extra 'fuzz') could not be installed; fuzz smoke tests will skip" >&2
	touch $(STAMP)

# Real peers to test against: libvfio-user's C sample servers, built from the pinned source in
# ../shared/peers (PEERS_TARBALL overrides) into .cache/peers (about 30 s once; then a no-op).
# Not part of `install`; the tests that need a peer build it through the same script.
peers:
	tools/build_peers.sh

# The test VM (vm/): a Debian trixie root with QEMU >= 10.1 from trixie-backports, the trixie
# kernel and an initramfs we build, all under .vm/ (about 1 min and 460 MB once, as root; then
# a no-op). `make vm-image FORCE=1` rebuilds it; `rm -rf .vm` removes it.
vm-image:
	$(PYTHON) -m vm build $(if $(FORCE),--force,)

# Boot the test guest with a shell on this terminal (Ctrl-A X stops QEMU). VM_SOCKETS: a
# space-separated list of vfio-user server sockets to give it as vfio-user-pci devices.
VM_SOCKETS ?=
vm: install vm-image
	$(PY) -m vm shell $(foreach s,$(VM_SOCKETS),--socket $(s))

demo: install
	$(VENV)/bin/python examples/demo.py

test: install vm-image
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

# Coverage-guided fuzzing (atheris): FUZZ_SECONDS per target; crashes land in fuzz/regressions/.
FUZZ_SECONDS ?= 60
fuzz: install
	$(PY) fuzz/run.py --seconds $(FUZZ_SECONDS)

# `make bench QUICK=1` runs a short version (fewer iterations; same figures).
bench: install
	$(VENV)/bin/python -m benchmarks $(if $(QUICK),--quick,)

# The sdist and the wheel (built from the sdist) in dist/. `make test` builds and
# tests them too (tests/docs/test_packaging.py installs the wheel in a fresh venv).
dist: install
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .fuzz-work
	find . -name '__pycache__' -prune -exec rm -rf {} +
	find shared/ring -name '_ring_cffi*' -delete
	find shared/evtchn -name '_guard_cffi*' -delete
