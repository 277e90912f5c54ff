"""What every command shares: one-line errors, model options, reading the config, output."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from dinm.config import LOAD_DTYPES  # (dinm.config imports no torch: `--help` stays instant)


def one_line_errors(fn):
    """Turn any error into one line on stderr and exit code 1 (2 for usage errors, click's own).
    Set DINM_DEBUG=1 to see the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("dinm: interrupted; nothing was written", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
            if os.environ.get("DINM_DEBUG"):
                raise
            from dinm.errors import DinmError

            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            label = "error" if isinstance(e, DinmError) else f"unexpected {type(e).__name__}"
            click.echo(f"dinm: {label}: {message}", err=True)
            sys.exit(1)

    return wrapper


model_argument = click.argument("model", metavar="MODEL")
dtype_option = click.option("--dtype", type=click.Choice(LOAD_DTYPES),
                            default="auto", show_default=True, help="Load the model in this dtype.")
device_map_option = click.option(
    "--device-map", type=click.Choice(["auto"]), default=None,
    help="Spread a model that does not fit one device over GPUs, CPU memory and disk (accelerate); layers "
         "offloaded to disk can be edited, but a delta for one is applied to the checkpoint (dinm apply).")
trust_option = click.option("--trust-remote-code", is_flag=True,
                            help="Run the model folder's own Python code (off by default).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def load(model: str, dtype: str, trust_remote_code: bool, device_map: str | None = None):
    from dinm.models import load_model

    click.echo(f"loading {model} ...", err=True)
    return load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map)


def read_config(path: str | None):
    """The EditConfig in the JSON file `path` (the default config when None)."""
    from dinm import EditConfig

    if not path:
        return EditConfig()
    with open(path, encoding="utf-8") as f:
        return EditConfig.from_json(f.read())


def emit(data: dict, as_json: bool, human: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else human)


def check_new_file(path: str, overwrite: bool, what: str) -> None:
    """Refuse to clobber a file, and fail early (before a model is loaded) when its folder does not exist."""
    if os.path.exists(path) and not overwrite:
        raise click.UsageError(f"{what} `{path}` exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise click.UsageError(f"{what} `{path}`: folder `{folder}` does not exist")
