"""Batch editing: one patch (`dinm.edit` with a list) from the records of one SafeEdit file, evaluated on another
file's records under both judges, and its cost against single edits.

    python benchmarks/bench_batch.py --train ../shared/safeedit/train_dev.json \\
        --test ../shared/safeedit/test_dev.json --before /tmp/dinm-eval.json

--before: a report of `bench_evaluate.py` on the same test records, benign and lookalike prompts and generation
settings: its unedited replies are reused (one unedited pass for both protocols).
"""

import argparse
import json
import os
import statistics
import time

import dinm
from dinm import terms
from dinm.evaluation import load_benign
from dinm.judge import is_refusal
from dinm.metrics import summarise
from dinm.unit import supported

from _report import BATCH_TARGETS, both_judges, cell, judges_table, targets_table
from _results import record

HERE = os.path.dirname(os.path.abspath(__file__))


def over_prompts(report: dict) -> str:
    """A patch is one model state: its list figures get their interval over prompts, not records."""
    rows = []
    for name, kind in (("benign", "unchanged"), ("lookalike", "unchanged"), ("lookalike", "over_refusal")):
        items = report[f"{name}_prompts"]
        if kind == "unchanged":
            values = [float(p["after"] == p["before"]) for p in items]
        else:
            values = [float(is_refusal(p["after"]) and not is_refusal(p["before"])) for p in items]
        rows.append(f"| {name} list, {kind} | {len(items)} | {cell(summarise(values), 'x')} |")
    return "| figure | prompts | % [95% bootstrap over prompts] |\n|---|---|---|\n" + "\n".join(rows)


def where(patch) -> str:
    """Where the patch edits: one layer, or a patch of units' units by layer."""
    if not patch.units:
        what = f"one unit ({patch.metadata['unit']}) for all, " if "unit" in patch.metadata else ""
        return f"{what}one layer located by the mean distance, layer {patch.layer}"
    per = {layer: sum(u["layer"] == layer for u in patch.units) for layer in patch.layers}
    return (f"one unit per record, each located and trained as its single edit of the model with the units before it "
            f"added: {len(patch.units)} units, in layers "
            + ", ".join(f"{layer} ({n})" for layer, n in per.items()))


def edit_and_time(model, tokenizer, train, config, args):
    """The batch edit of `train` (saved to --patch) and --singles single edits, each timed: (the patch, batch
    seconds, mean single seconds, how many singles and their spread)."""
    dinm.edit(model, tokenizer, train[0], config.replace(steps=1))  # warm: the key statistic and kernels
    terms.forget_replies()  # (each edit timed here generates its own replies, as a first edit does)
    started = time.perf_counter()
    patch = dinm.edit(model, tokenizer, train, config)
    batch_s = time.perf_counter() - started
    patch.save(args.patch)
    print(f"batch edit of {len(train)} records: {batch_s:.1f} s, {where(patch)}")
    singles = []
    for inst in train[:args.singles]:
        terms.forget_replies()
        started = time.perf_counter()
        dinm.edit(model, tokenizer, inst, config)
        singles.append(time.perf_counter() - started)
    single_s = statistics.mean(singles)
    print(f"single edits: {single_s:.1f} s mean over {len(singles)}; x{len(train)} = {single_s * len(train):.0f} s")
    return patch, batch_s, single_s, f"{len(singles)} of them (min {min(singles):.1f}, max {max(singles):.1f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", default="../shared/safeedit/train_dev.json")
    parser.add_argument("--test", default="../shared/safeedit/test_dev.json")
    parser.add_argument("--before", help="bench_evaluate.py's report: its unedited replies are reused")
    parser.add_argument("--singles", type=int, default=8, help="single edits timed for the cost comparison")
    parser.add_argument("--benign", default=os.path.join(HERE, "..", "data", "benign.json"))
    parser.add_argument("--lookalike", default=os.path.join(HERE, "..", "data", "lookalike.json"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--patch", default="/tmp/dinm-patch.safetensors")
    parser.add_argument("--report", default="/tmp/dinm-batch.json")
    parser.add_argument("--config", default="{}", help="EditConfig fields as JSON, e.g. '{\"matrix\": \"unit\", ...}' "
                        "(default: the default EditConfig)")
    parser.add_argument("--section", default="Batch editing: one patch from train_dev.json, evaluated on test_dev.json")
    parser.add_argument("--from-patch", metavar="BATCH_S,SINGLE_S,N",
                        help="evaluate the patch already at --patch, made by an earlier run of this script that was "
                             "stopped during its evaluation, instead of editing; give the cost that run printed: the "
                             "batch edit's seconds, the single edits' mean seconds and their number")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    config = dinm.EditConfig.from_json(args.config)
    label = "the default `EditConfig()`" if config == dinm.EditConfig() else f"`EditConfig` `{args.config}`"

    train, test = dinm.load_instances(args.train), dinm.load_instances(args.test)
    model, tokenizer = dinm.load_model("embedded")
    ran = config.resolved(supported(model), len(train))  # (what `dinm.edit` runs for this list)
    if ran != config:
        label += f" (here matrix={ran.matrix!r})"
    if args.from_patch:
        patch = dinm.Delta.load(args.patch)
        if patch.instance_ids != [inst.id for inst in train] or patch.config != ran:
            raise SystemExit(f"{args.patch} was not made from {args.train} with --config {args.config}")
        batch_s, single_s, n = (float(x) for x in args.from_patch.split(","))
        spread = f"{int(n)} of them (the run that made the patch)"
    else:
        patch, batch_s, single_s, spread = edit_and_time(model, tokenizer, train, config, args)

    before = None
    if args.before:
        with open(args.before, encoding="utf-8") as f:
            before = json.load(f)
    report = dinm.evaluate(model, tokenizer, test, delta=patch, benign=load_benign(args.benign),
                           lookalike=load_benign(args.lookalike), max_new_tokens=args.max_new_tokens, before=before)
    report["batch"] = {"train": args.train, "seconds": batch_s, "single_seconds_mean": single_s}
    with open(args.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    refusal, semantic = both_judges(report, args.test)
    table, targets, lists = judges_table(refusal, semantic), targets_table(refusal, semantic, BATCH_TARGETS), \
        over_prompts(report)
    history = patch.history
    print(table, targets, lists, sep="\n\n")
    if args.no_write:
        return
    record(args.section, (
        f"One delta from all {len(train)} records of `{os.path.basename(args.train)}` (`dinm.edit(model, tok, "
        f"instances)`, {label}: {where(patch)}; mean NLL of the safe responses {history[0].nll:.3f} -> "
        f"{history[-1].nll:.3f} in {len(history)} steps{' (means over the units)' if patch.units else ''}), applied "
        f"to the embedded model and evaluated on the {len(test)} records of `{os.path.basename(args.test)}` (other "
        f"records: no test record was edited from), greedy {args.max_new_tokens} new tokens, both judges (the "
        f"semantic head trained on {os.path.basename(args.test)}). Mean [95% bootstrap over records].\n\n{table}\n\n"
        f"The patch is one model state, so its list figures are one value for every record; over prompts:\n\n"
        f"{lists}\n\nAgainst the batch targets of issue 19:\n\n{targets}\n\nCost: the batch edit took "
        f"{batch_s:.0f} s for {len(train)} records; a single edit (same config) of the first {spread} took "
        f"{single_s:.1f} s on average, so {len(train)} single edits would take about {single_s * len(train):.0f} s "
        f"(mean x {len(train)}, not all {len(train)} run): "
        f"the batch edit costs {batch_s / (single_s * len(train)):.2f}x that, and gives one patch instead of "
        f"{len(train)}. Timed with nothing else running"
        + (" (but a 10-s pytest run during the batch edit)" if args.from_patch else "") + "."))


if __name__ == "__main__":
    main()
