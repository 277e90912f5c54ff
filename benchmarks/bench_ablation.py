"""Detox quality of edit settings, side by side: the paper's setting against dinm's variants, each evaluated
with `dinm.evaluate` (single-instance protocol) on the same records, same prompts, same judge.

    python benchmarks/bench_ablation.py --limit 16 --max-new-tokens 48

A first, small ablation (fewer records and tokens than bench_evaluate.py, no benign list: each variant costs
minutes on 2 cores); it is the measurement the defaults must be chosen by.
"""

import argparse
import json
import time

import dinm
from dinm import EditConfig

from _results import record

# "paper": EasyEdit's locate rule, no chat template for the edit, and no KL gradient — a KL term without
# gradient changes nothing in the update, which is what kl_weight=0 gives.
VARIANTS = {
    "paper (`EditConfig.paper()`: locate `paper`, no chat template, KL without gradient)": EditConfig.paper(),
    "dinm default (cosine, KL weight 1, 10 steps, lr 5e-4)": EditConfig(),
    "lr 2e-3": EditConfig(lr=2e-3),
    "20 steps": EditConfig(steps=20),
    "KL weight 0.1": EditConfig(kl_weight=0.1),
    "locate l2 (last layer)": EditConfig(distance="l2"),
    "rows 0.1 (row-restricted update), lr 2e-3": EditConfig(rows=0.1, lr=2e-3),
}
COLUMNS = ("DS", "DG_avg", "DS_judge", "degenerate", "fluency", "benign_unchanged", "benign_f1")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/safeedit/test_dev.json")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    records = dinm.load_instances(args.data)[:args.limit]
    model, tokenizer = dinm.load_model("embedded")
    rows = ["| setting | " + " | ".join(COLUMNS) + " | s / record |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    before = None
    for name, config in VARIANTS.items():
        started = time.perf_counter()
        report = dinm.evaluate(model, tokenizer, records, edit=config, max_new_tokens=args.max_new_tokens,
                               progress=False)
        seconds = (time.perf_counter() - started) / len(records)
        before = before or report["metrics"]["before"]
        m = report["metrics"]["after"]
        cells = [f"{m[c]['mean']:.3f}" if c in ("fluency", "benign_f1") else f"{100 * m[c]['mean']:.1f}%"
                 for c in COLUMNS]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |")
        print(rows[-1], flush=True)
        print(json.dumps(config.to_dict()), flush=True)
    first = ["| unedited | " + " | ".join(
        f"{before[c]['mean']:.3f}" if c in ("fluency", "benign_f1") else
        (f"{100 * before[c]['mean']:.1f}%" if c in before else "–") for c in COLUMNS) + " | |"]
    table = "\n".join(rows[:2] + first + rows[2:])
    print(table)
    if not args.no_write:
        record("Ablation: edit settings (first pass)", (
            f"Embedded SmolLM2-135M-Instruct, the first {len(records)} records of `{args.data.split('/')[-1]}`, "
            f"single-instance protocol, judge `refusal`, greedy {args.max_new_tokens} new tokens, no benign list "
            f"(benign = the record's knowledge-constrain prompt). DS/DG count coherent safe replies only; means "
            f"over records (intervals are wide at this size; see the full reports' bootstrap).\n\n{table}"))


if __name__ == "__main__":
    main()
