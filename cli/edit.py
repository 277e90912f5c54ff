"""`dinm edit MODEL --instance q.json -o delta.safetensors`"""

import click

from dinm.config import COMPUTE_DTYPES, DISTANCES, MATRICES, PRECONDITIONS, UNIT_SETTING, VARIANTS

from ._common import (check_new_file, device_map_option, dtype_option, emit, json_option, load,
                      model_argument, one_line_errors, read_config, trust_option)


@click.command("edit")
@model_argument
@click.option("--instance", "instance_path", required=True, type=click.Path(dir_okay=False),
              help="JSON file: a SafeEdit record, the short form, or a list of them.")
@click.option("--index", type=click.IntRange(min=0), help="Which record of the file to use [default: 0].")
@click.option("--all", "use_all", is_flag=True,
              help="Batch edit: one delta from every record of the file (a list of failures, one patch).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Delta file to write.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="EditConfig JSON; the options below override it.")
@click.option("--layer", type=int, help="Edit this layer instead of locating one.")
@click.option("--distance", type=click.Choice(list(DISTANCES)), help="Locate rule.")
@click.option("--steps", type=int, help="Optimiser steps [default: 40 for a unit, 50 for a matrix].")
@click.option("--lr", type=float, help="Learning rate [default: 1e-2 for a unit, 2e-3 for a matrix].")
@click.option("--kl-weight", type=float, help="Weight of the KL term on the benign prompt.")
@click.option("--unsafe-weight", type=float, help="Weight of a term that makes the unsafe response "
              "less likely (a hinge, up to 1 nat per token above the unedited model's NLL) [default: 0, none].")
@click.option("--rank", type=click.IntRange(min=1), help="Train a rank-R update, stored factored (dinm export "
                                                         "turns it into a LoRA adapter exactly).")
@click.option("--precondition", type=click.Choice(PRECONDITIONS),
              help="keys: Adam steps whitened by the inputs of text the edit must keep [default: none; README].")
@click.option("--matrix", type=click.Choice(MATRICES),
              help="What of the MLP to train: unit (one unit as a thresholded detector), down (the output projection, "
                   "DINM's), gate, up; auto: for one record where the MLP is gated two units (EditConfig.two_units(): "
                   "the request's and the wrappers', each fitted on over its replies' first 2 tokens), else down "
                   "[default: auto].")
@click.option("--variants", type=click.Choice(VARIANTS),
              help="What the edit trains besides the attack: request (the request read from it), wrapped (that too "
                   "inside dinm's written wrappers), request+wrapped (a unit edit: two units, one for each), none "
                   "[default: request+wrapped for auto's unit edit, request for --matrix unit, none for a matrix].")
@click.option("--unit-reply-on", type=click.IntRange(min=0),
              help="A unit edit: fit each unit's gate on at its trained safe responses' first N tokens too, so that it "
                   "carries the refusal past the reply's opening [default: 2 for auto's unit edit, else 0].")
@click.option("--unit", "unit_setting", is_flag=True,
              help="The one-unit edit (EditConfig.unit(): --matrix unit, the request alone as a second target, "
                   "40 steps at lr 1e-2, no fit over the reply; the default on a gated MLP before dinm 0.8, about a third "
                   "of its cost), refused where the MLP has no gate; it overrides those fields of --config, the "
                   "options above override it.")
@click.option("--unit-per-instance", is_flag=True,
              help="With --all: a patch of one unit per record (Transformer-Patcher's batch edit) instead of one unit "
                   "for all; implies --unit. Measured worse than the dense patch on SafeEdit (README).")
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES),
              help="dtype of the edit's passes: auto (bf16 where the device multiplies it natively), model, bfloat16.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@dtype_option
@device_map_option
@trust_option
@json_option
@one_line_errors
def edit_cmd(model, instance_path, index, use_all, output, config_path, layer, distance, steps, lr, kl_weight,
             unsafe_weight, rank, precondition, matrix, variants, unit_reply_on, unit_setting, unit_per_instance,
             compute_dtype,
             overwrite, dtype, device_map, trust_remote_code, as_json):
    """Locate the toxic layer, edit it, and write the edit as a .safetensors delta."""
    import os
    import time

    from dinm import edit, load_instance, load_instances
    from dinm.history import describe, summary

    if use_all and index is not None:
        raise click.UsageError("give --index (one record) or --all (every record), not both")
    if unit_per_instance and not use_all:
        raise click.UsageError("--unit-per-instance makes a patch of one unit per record: give --all too")
    check_new_file(output, overwrite, "output")
    # Bad input fails before the model is loaded.
    instance = load_instances(instance_path) if use_all else load_instance(instance_path, index or 0)
    config = read_config(config_path)
    if unit_setting or unit_per_instance:
        config = config.replace(**UNIT_SETTING, **({"unit_per_instance": True} if unit_per_instance else {}))
    overrides = dict(layer=layer, distance=distance, steps=steps, lr=lr, kl_weight=kl_weight,
                     unsafe_weight=unsafe_weight, rank=rank, precondition=precondition, matrix=matrix,
                     variants=variants, unit_reply_on=unit_reply_on, compute_dtype=compute_dtype)
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    net, tokenizer = load(model, dtype, trust_remote_code, device_map)
    started = time.perf_counter()
    delta = edit(net, tokenizer, instance, config, progress=not as_json)
    seconds = time.perf_counter() - started
    delta.save(output)
    data = {"output": output, "bytes": os.path.getsize(output), "layer": delta.layer, "layers": delta.layers,
            "tensors": delta.names, "seconds": round(seconds, 3), **summary(delta.history)}
    data["compute"] = delta.metadata.get("compute")
    what = f"{len(instance)} instances: " if use_all else ""
    data["instances"] = len(instance) if use_all else 1
    where = f"layer {delta.layer}" if not delta.units else \
        f"{len(delta.units)} units in layers {', '.join(map(str, delta.layers))}"
    emit(data, as_json, f"edited {what}{where} ({', '.join(delta.names)}) in {seconds:.1f}s, passes in "
                        f"{data['compute']}: {describe(delta.history)}"
                        + (" (means over the units)" if delta.units else "")
                        + f"\nwrote {output} ({data['bytes'] / 1e6:.2f} MB)")
