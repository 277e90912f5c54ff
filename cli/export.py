"""`dinm export DELTA [DELTA ...] -o ADAPTER_DIR [--rank R | --energy E]` (`dinm.export.to_peft`)."""

import click

from ._common import emit, json_option, one_line_errors


@click.command("export")
@click.argument("delta_paths", metavar="DELTA...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="New adapter folder to write (must not exist).")
@click.option("--rank", type=click.IntRange(min=1), help="Rank of a dense update's truncated SVD (and the most a "
                                                         "factored one keeps).")
@click.option("--energy", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Instead of --rank: the smallest rank holding this share of the squared singular values.")
@json_option
@one_line_errors
def export_cmd(delta_paths, output, rank, energy, as_json):
    """Write DELTA(s) as one PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors).

    A factored delta (`EditConfig(rank=r)`) or a masked one (a unit edit's) is exported exactly; a dense one by
    truncated SVD (--rank or --energy), with its relative Frobenius error printed. Deltas of different layers go into one adapter.
    Load it with `peft.PeftModel.from_pretrained(model, ADAPTER_DIR)` or a LoRA-serving stack."""
    import dataclasses

    from dinm import Delta
    from dinm.atomic import check_new_folder
    from dinm.errors import DinmError
    from dinm.export import to_peft

    if rank is not None and energy is not None:
        raise click.UsageError("give either --rank or --energy, not both")
    try:
        check_new_folder(output)
    except DinmError as e:
        raise click.UsageError(str(e)) from None
    deltas = [Delta.load(p) for p in delta_paths]  # every file checked before anything is written
    written = to_peft(deltas, output, rank=rank, energy=energy)
    lines = [f"wrote LoRA adapter {output} (r = {max(w.rank for w in written)}, from {len(deltas)} delta(s))"]
    lines += [f"  {w.module}: rank {w.rank}, " + ("exact (factored or masked delta)" if w.exact else
                                                   f"truncated SVD, relative Frobenius error {w.error:.4f}")
              for w in written]
    emit({"output": output, "deltas": list(delta_paths), "modules": [dataclasses.asdict(w) for w in written]},
         as_json, "\n".join(lines))
