"""`dinm apply DELTA CHECKPOINT [-o OUT | --in-place]` and `dinm revert ...` (`dinm.apply_delta`).

A safetensors checkpoint folder (single file or sharded) is edited on disk without loading the model: only the
shard holding the edited tensor is rewritten (see `dinm.checkpoint`). `embedded` (a GGUF model) is loaded,
edited and saved to `-o OUT` as a safetensors checkpoint."""

import click

from ._common import dtype_option, emit, json_option, load, one_line_errors, trust_option


def _command(direction: str, doc: str):
    @click.command(direction, help=doc)
    @click.argument("delta_path", metavar="DELTA", type=click.Path(dir_okay=False))
    @click.argument("model", metavar="CHECKPOINT")
    @click.option("-o", "--output", type=click.Path(file_okay=False), help="New folder to write (must not exist).")
    @click.option("--in-place", is_flag=True, help="Rewrite the checkpoint folder itself (crash-safe).")
    @click.option("--force", is_flag=True, help="Skip the check that the weights are the ones the delta expects.")
    @click.option("--copy", is_flag=True,
                  help="With -o: copy the unchanged weight shards instead of hard-linking them.")
    @dtype_option
    @trust_option
    @json_option
    @one_line_errors
    def command(delta_path, model, output, in_place, force, copy, dtype, trust_remote_code, as_json):
        import os

        from dinm import Delta, apply_delta
        from dinm.atomic import check_new_folder
        from dinm.errors import DinmError

        if bool(output) == in_place:
            raise click.UsageError("give either -o NEW_FOLDER or --in-place")
        folder = os.path.isdir(model)
        if in_place and not folder:
            raise click.UsageError(f"--in-place needs a checkpoint folder; `{model}` is not one")
        if output:
            try:
                check_new_folder(output)  # before a model is loaded
            except DinmError as e:
                raise click.UsageError(str(e)) from None
        delta = Delta.load(delta_path)  # a bad delta fails before the model is touched
        target, tokenizer = (model, None) if folder else load(model, dtype, trust_remote_code)
        written = apply_delta(delta, target, output, revert=direction == "revert", force=force, link=not copy,
                              tokenizer=tokenizer)
        emit({"action": direction, "delta": delta_path, "model": model, "output": output, "in_place": in_place,
              "tensors": delta.names, "shards_rewritten": written}, as_json,
             f"{'reverted' if direction == 'revert' else 'applied'} {delta_path} ({', '.join(delta.names)}); wrote "
             f"{output or model + ' (in place)'}: {', '.join(written)}")

    return command


apply_cmd = _command("apply", "Apply DELTA to CHECKPOINT (a safetensors folder, or `embedded`): into a new folder "
                              "(-o) or in place.")
revert_cmd = _command("revert", "Revert DELTA from an edited CHECKPOINT: into a new folder (-o) or in place.")
