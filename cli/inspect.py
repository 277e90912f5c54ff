"""`dinm inspect delta.safetensors`"""

import click

from ._common import emit, json_option, one_line_errors


@click.command("inspect")
@click.argument("delta_path", metavar="DELTA_OR_CHECKPOINT", type=click.Path())
@json_option
@one_line_errors
def inspect_cmd(delta_path, as_json):
    """Show what a delta holds (tensors, base model, layer, config, loss history), or which deltas a
    checkpoint folder has applied, in order."""
    import os

    from dinm import Delta
    from dinm.history import describe

    if os.path.isdir(delta_path):
        from dinm.checkpoint import chain

        applied = chain(delta_path)
        lines = [f"{delta_path}: {len(applied)} delta(s) applied, oldest first"]
        lines += [f"  {i + 1}. delta {c['id']} (instance {c.get('instance_id') or '?'}): {', '.join(c['tensors'])} "
                  f"in {c['shard']}" for i, c in enumerate(applied)]
        emit({"checkpoint": delta_path, "chain": applied}, as_json, "\n".join(lines))
        return

    delta = Delta.load(delta_path)
    summary = delta.summary()
    summary["file_bytes"] = os.path.getsize(delta_path)
    lines = [f"{delta_path}: {summary['format']}, dinm {summary['dinm_version']}, {summary['file_bytes']} bytes",
             f"base model: {summary.get('base_model') or '?'} ({summary.get('model_type', '?')})"
             + (f" revision {summary['base_revision']}" if summary.get("base_revision") else ""),
             f"layer: {summary.get('layer', '?')} (distance: {summary.get('distance', '?')})"
             + (f", unit {summary['unit']} repurposed (matrix=unit)" if "unit" in summary else "")]
    if summary.get("units"):
        how = ", ".join(f"{k}={v}" for k, v in (("variants", delta.config.variants),
                                                ("unit_per_instance", delta.config.unit_per_instance)) if v
                        and v != "request")  # (what made it several units)
        lines[-1] = (f"a patch of {len(summary['units'])} units (matrix=unit{', ' + how if how else ''}) in layers "
                     f"{', '.join(map(str, summary['layers']))} (distance: {summary.get('distance', '?')})")
        lines += [f"  unit {u['unit']} of layer {u['layer']}: "
                  + (f"instance {u['instance_id']}" if len(u.get("instance_ids", [None])) == 1
                     else f"{len(u['instance_ids'])} instances")
                  + (f" ({u['variants']})" if u.get("variants") else "") + f", {u['steps_run']} steps, "
                  f"safe-response NLL {u['nll_first']:.3f} -> {u['nll_last']:.3f}" for u in summary["units"]]
    for name, t in summary["tensors"].items():
        form = {"dense": "dense", "factored": f"factored, rank {t.get('rank')}",
                "columns": f"masked: {t.get('columns_changed')} of {t['shape'][-1]} columns"}.get(
            t["form"], f"masked: {t['rows_changed']} of {t['shape'][0]} rows")
        lines.append(f"  {name}: {t['dtype']}{t['shape']}, {form}, {t['stored_bytes']} bytes stored, "
                     f"|update| {t['update_norm']:.4g}, max {t['max_abs']:.3g}, "
                     f"{t['exactness_fixups']} exactness fixups")
        lines.append(f"    base sha256 {t['base_sha256'][:16]}…  edited sha256 {t['edited_sha256'][:16]}…")
    history = delta.history
    if history:
        lines.append(f"edit: {describe(history)}" + (" (means over the units)" if summary.get("units") else ""))
    if "seconds" in summary:
        from dinm.history import phases

        compute = f"; passes in {summary['compute']}" if "compute" in summary else ""
        lines.append(f"time: {phases(summary['seconds'], 'unit' in summary or 'units' in summary)}{compute}")
    if summary.get("config"):
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["config"].items())))
    emit(summary, as_json, "\n".join(lines))
