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


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _wheel_cuda_includes(torch) -> list:
    """Include folders of the NVIDIA wheels installed beside torch (site-packages/nvidia/*/include)."""
    root = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(p) for p in root.glob("*/include") if p.is_dir())


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
        """BuildExtension whose failure is a warning: a failed extension is dropped from the build's outputs, so
        that neither the in-place copy of an editable install nor a wheel looks for a file that was not made."""

        failed: set = set()

        def build_extensions(self):  # (torch checks the compiler here, before building any extension)
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - any build failure falls back to the twin
                self.failed.update(ext.name for ext in self.extensions)
                _say(f"the C++ extension was not built ({type(e).__name__}: {first_line(e)}); "
                     f"dinm will use its PyTorch twin")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any build failure falls back to the twin
                self.failed.add(ext.name)
                _say(f"the C++ extension was not built ({type(e).__name__}: {first_line(e)}); "
                     f"dinm will use its PyTorch twin")

        def copy_extensions_to_source(self):  # (editable installs)
            built = [ext for ext in self.extensions if ext.name not in self.failed]
            self.extensions, everything = built, self.extensions
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = everything

        def get_outputs(self):
            return [path for ext, path in zip(self.extensions, super().get_outputs()) if ext.name not in self.failed]

    sources = ["csrc/dinm_ops.cpp"]
    args = {"cxx": ["-O3", "-fopenmp", "-Wall"]}
    cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("DINM_NO_CUDA") != "1"
    if cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch picks the architectures of the GPUs it sees; with none it cannot (and fails in the build).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        _say("no GPU visible: building CUDA kernels for sm_80 and sm_90 (set TORCH_CUDA_ARCH_LIST to choose)")
    if cuda:
        sources.append("csrc/dinm_ops_cuda.cu")
        args["nvcc"] = ["-O3", "-Xcompiler", "-Wall"]
        # The CUDA math headers torch needs (cusparse.h, ...) come with its wheel (nvidia/cu*/include), not always
        # with the toolkit.
        for include in _wheel_cuda_includes(torch):
            args["nvcc"] += ["-I", include]
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
    package_data={"dinm": ["benign_corpus.json", "lookalike_corpus.json", "wrapper_corpus.json"]},
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
        # loading an exported LoRA adapter (dinm.export.load_peft); writing one needs no peft
        "peft": ["peft>=0.17"],
        "test": ["pytest>=8", "hypothesis>=6.100", "matplotlib>=3.7", "peft>=0.17"],
    },
    entry_points={"console_scripts": ["dinm=dinm_cli:main"]},
    **extension(),
)
