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
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    train, test = dinm.load_instances(args.train), dinm.load_instances(args.test)
    model, tokenizer = dinm.load_model("embedded")
    dinm.edit(model, tokenizer, train[0], dinm.EditConfig(steps=1))  # warm: the key statistic and kernels
    terms.forget_replies()  # (each edit timed here generates its own replies, as a first edit does)
    started = time.perf_counter()
    patch = dinm.edit(model, tokenizer, train)
    batch_s = time.perf_counter() - started
    patch.save(args.patch)
    print(f"batch edit of {len(train)} records: {batch_s:.1f} s, layer {patch.layer}")
    singles = []
    for inst in train[:args.singles]:
        terms.forget_replies()
        started = time.perf_counter()
        dinm.edit(model, tokenizer, inst)
        singles.append(time.perf_counter() - started)
    single_s = statistics.mean(singles)
    print(f"single edits: {single_s:.1f} s mean over {len(singles)}; x{len(train)} = {single_s * len(train):.0f} s")

    before = None
    if args.before:
        with open(args.before, encoding="utf-8") as f:
            before = json.load(f)
    report = dinm.evaluate(model, tokenizer, test, delta=patch, benign=load_benign(args.benign),
                           lookalike=load_benign(args.lookalike), max_new_tokens=args.max_new_tokens, before=before)
    report["batch"] = {"train": args.train, "seconds": batch_s, "single_seconds": singles}
    with open(args.report, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    refusal, semantic = both_judges(report, args.test)
    table, targets, lists = judges_table(refusal, semantic), targets_table(refusal, semantic, BATCH_TARGETS), \
        over_prompts(report)
    history = patch.history
    print(table, targets, lists, sep="\n\n")
    if args.no_write:
        return
    record("Batch editing: one patch from train_dev.json, evaluated on test_dev.json", (
        f"One delta from all {len(train)} records of `{os.path.basename(args.train)}` (`dinm.edit(model, tok, "
        f"instances)`, default `EditConfig`: one layer located by the mean distance, layer {patch.layer}; mean NLL "
        f"of the safe responses {history[0].nll:.3f} -> {history[-1].nll:.3f} in {len(history)} steps), applied "
        f"to the embedded model and evaluated on the {len(test)} records of `{os.path.basename(args.test)}` (other "
        f"records: no test record was edited from), greedy {args.max_new_tokens} new tokens, both judges (the "
        f"semantic head trained on {os.path.basename(args.test)}). Mean [95% bootstrap over records].\n\n{table}\n\n"
        f"The patch is one model state, so its list figures are one value for every record; over prompts:\n\n"
        f"{lists}\n\nAgainst the batch targets of issue 19:\n\n{targets}\n\nCost: the batch edit took "
        f"{batch_s:.0f} s for {len(train)} records; a single default edit of the first {len(singles)} of them took "
        f"{single_s:.1f} s on average (min {min(singles):.1f}, max {max(singles):.1f}), so {len(train)} single "
        f"edits would take about {single_s * len(train):.0f} s (mean x {len(train)}, not all {len(train)} run): "
        f"the batch edit costs {batch_s / (single_s * len(train)):.2f}x that, and gives one patch instead of "
        f"{len(train)}. Timed with nothing else running."))


if __name__ == "__main__":
    main()
