# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
APT_PACKAGES := hdf5-tools dataset-fashion-mnist python3-venv

.PHONY: setup system-deps demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: the CPU build on this machine's disk (an unpinned torch pulls CUDA).
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test,plots]'
	touch $@

system-deps:
	@if ! command -v h5dump >/dev/null || [ ! -d /usr/share/datasets/fashion-mnist ] \
	    || ! $(PY) -c 'import ensurepip, venv' 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(APT_PACKAGES); \
	fi

setup: system-deps $(VENV)/.installed

demo: setup
	$(VENV)/bin/fmcache demo

test: setup
	$(VPY) -m pytest -q -p no:cacheprovider

lint: setup
	@[ -x $(VENV)/bin/ruff ] && [ -x $(VENV)/bin/mypy ] || $(VPY) -m pip install -q -e '.[dev]'
	$(VENV)/bin/ruff check fmcache tests tools
	$(VENV)/bin/mypy fmcache

clean:
	rm -rf $(VENV) runs build *.egg-info
