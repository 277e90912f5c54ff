"""`dinm apply DELTA CHECKPOINT [-o OUT | --in-place]` and `dinm revert ...`.

A safetensors checkpoint folder (single file or sharded) is edited on disk without loading the model: only the
shard holding the edited tensor is rewritten (see `dinm.checkpoint`). `embedded` (a GGUF model) is loaded,
edited and saved to `-o OUT` as a safetensors checkpoint."""

import click

from ._common import dtype_option, emit, json_option, one_line_errors, trust_option


def _run(direction: str, delta_path: str, model: str, output: str | None, in_place: bool, force: bool, copy: bool,
         dtype: str, trust_remote_code: bool, as_json: bool) -> None:
    import os

    from dinm import Delta

    if bool(output) == in_place:
        raise click.UsageError("give either -o NEW_FOLDER or --in-place")
    if output and os.path.exists(output):
        raise click.UsageError(f"output folder `{output}` exists; choose a new folder")
    delta = Delta.load(delta_path)  # a bad delta fails before the model is touched
    revert = direction == "revert"
    if os.path.isdir(model):
        from dinm.checkpoint import apply_to_folder

        shards = apply_to_folder(delta, model, output, revert=revert, force=force, link=not copy)
        where = output or f"{model} (in place)"
    else:
        if in_place:
            raise click.UsageError(f"--in-place needs a checkpoint folder; `{model}` is not one")
        shards = ["(whole model saved)"]
        _load_and_save(delta, model, output, revert, force, dtype, trust_remote_code)
        where = output
    verb = "reverted" if revert else "applied"
    emit({"action": direction, "delta": delta_path, "model": model, "output": output, "in_place": in_place,
          "tensors": delta.names, "shards_rewritten": shards}, as_json,
         f"{verb} {delta_path} ({', '.join(delta.names)}); wrote {where}: {', '.join(shards)}")


def _load_and_save(delta, model, output, revert, force, dtype, trust_remote_code) -> None:
    import os

    from dinm.atomic import new_folder

    from ._common import load

    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise click.UsageError(f"output folder `{output}`: parent folder `{parent}` does not exist")
    net, tokenizer = load(model, dtype, trust_remote_code)
    (delta.revert if revert else delta.apply)(net, force=force)
    with new_folder(output) as tmp:
        net.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _command(direction: str, doc: str):
    @click.command(direction, help=doc)
    @click.argument("delta_path", metavar="DELTA", type=click.Path(dir_okay=False))
    @click.argument("model", metavar="CHECKPOINT")
    @click.option("-o", "--output", type=click.Path(file_okay=False), help="New folder to write (must not exist).")
    @click.option("--in-place", is_flag=True, help="Rewrite the checkpoint folder itself (crash-safe).")
    @click.option("--force", is_flag=True, help="Skip the check that the weights are the ones the delta expects.")
    @click.option("--copy", is_flag=True, help="With -o: copy the unchanged weight shards instead of hard-linking them.")
    @dtype_option
    @trust_option
    @json_option
    @one_line_errors
    def command(delta_path, model, output, in_place, force, copy, dtype, trust_remote_code, as_json):
        _run(direction, delta_path, model, output, in_place, force, copy, dtype, trust_remote_code, as_json)

    return command


apply_cmd = _command("apply", "Apply DELTA to CHECKPOINT (a safetensors folder, or `embedded`): into a new folder "
                              "(-o) or in place.")
revert_cmd = _command("revert", "Revert DELTA from an edited CHECKPOINT: into a new folder (-o) or in place.")
