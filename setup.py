"""dinm: detoxifying language models by knowledge editing (DINM), with compact revertible deltas."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "dinm" / "__init__.py").read_text()).group(1)

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
)
