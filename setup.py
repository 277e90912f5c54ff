"""dinm: detoxifying language models by knowledge editing (DINM), with compact revertible deltas."""

import os
import re
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "dinm" / "version.py").read_text()).group(1)


def _say(message: str) -> None:
    print(f"dinm setup: {message}", file=sys.stderr)


def extension():
    """The C++ ops as `dinm._C` (plus the CUDA kernels when torch has CUDA and a toolkit is present), or nothing.

    Never fatal: without torch at build time, without a compiler, or when the build fails, dinm installs
    without it and runs its PyTorch twin (`dinm.ops.backend()` says which). DINM_NO_EXT=1 skips the build.
    """
    if os.environ.get("DINM_NO_EXT") == "1":
        _say("DINM_NO_EXT=1: not building the C++ extension")
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        _say("torch is not importable at build time (use pip install --no-build-isolation); no C++ extension")
        return {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any build failure falls back to the twin
                _say(f"the C++ extension was not built ({type(e).__name__}: {e}); dinm will use its PyTorch twin")

    sources = ["csrc/dinm_ops.cpp"]
    args = {"cxx": ["-O3", "-fopenmp"]}
    cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("DINM_NO_CUDA") != "1"
    if cuda:
        sources.append("csrc/dinm_ops_cuda.cu")
        args["nvcc"] = ["-O3"]
    make = CUDAExtension if cuda else CppExtension
    _say(f"building dinm._C for CPU{' and CUDA' if cuda else ''}")
    ext = make("dinm._C", sources, extra_compile_args=args, extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(
    name="dinm",
    version=VERSION,
    description="Detoxify language models with DINM knowledge edits stored as small safetensors deltas",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The CLI lives in cli/ and installs as `dinm_cli`, so that `dinm --help` never imports torch.
    packages=["dinm", "dinm_cli"],
    package_dir={"dinm": "dinm", "dinm_cli": "cli"},
    package_data={"dinm": ["benign_corpus.json"]},
    # torch is deliberately unpinned-above here; install torch yourself first (CPU wheel: torch==2.13.0),
    # otherwise pip may pull a multi-GB CUDA build.
    install_requires=[
        "torch>=2.1",
        "transformers>=4.46",
        "safetensors>=0.4.3",
        "accelerate>=0.34",
        "gguf>=0.10",
        "click>=8.1",
        "tqdm>=4.66",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "hypothesis>=6.100", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["dinm=dinm_cli:main"]},
    **extension(),
)
