"""`dinm apply DELTA MODEL -o OUT` and `dinm revert DELTA MODEL -o OUT`: write an edited (or restored) copy
of a model folder. The input folder is never modified."""

import click

from ._common import dtype_option, emit, json_option, one_line_errors, trust_option


def _run(direction: str, delta_path: str, model: str, output: str, force: bool, dtype: str,
         trust_remote_code: bool, as_json: bool) -> None:
    import os
    import shutil
    import tempfile

    from dinm import Delta

    from ._common import load

    if os.path.exists(output):
        raise click.UsageError(f"output folder `{output}` exists; choose a new folder")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise click.UsageError(f"output folder `{output}`: parent folder `{parent}` does not exist")
    delta = Delta.load(delta_path)  # a bad delta fails before the model is loaded
    net, tokenizer = load(model, dtype, trust_remote_code)
    getattr(delta, direction)(net, force=force)
    tmp = tempfile.mkdtemp(prefix=".dinm-", dir=parent)
    try:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    verb = "applied" if direction == "apply" else "reverted"
    emit({"action": direction, "delta": delta_path, "model": model, "output": output, "tensors": delta.names},
         as_json, f"{verb} {delta_path} ({', '.join(delta.names)}); wrote {output}")


def _command(direction: str, doc: str):
    @click.command(direction, help=doc)
    @click.argument("delta_path", metavar="DELTA", type=click.Path(dir_okay=False))
    @click.argument("model", metavar="MODEL")
    @click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
                  help="New folder to write the model to (must not exist).")
    @click.option("--force", is_flag=True, help="Skip the check that the weights are the ones the delta expects.")
    @dtype_option
    @trust_option
    @json_option
    @one_line_errors
    def command(delta_path, model, output, force, dtype, trust_remote_code, as_json):
        _run(direction, delta_path, model, output, force, dtype, trust_remote_code, as_json)

    return command


apply_cmd = _command("apply", "Apply DELTA to MODEL and write the edited model to a new folder.")
revert_cmd = _command("revert", "Revert DELTA from an edited MODEL and write the restored model to a new folder.")
