"""Detox quality of edit settings, side by side: the paper's setting against dinm's variants, each evaluated
with `dinm.evaluate` (single-instance protocol) on the same records, the same prompts, the same judge, and the
same held-out benign list; the unedited pass is generated once and reused (`evaluate(before=...)`).

    python benchmarks/bench_ablation.py --limit 16 --max-new-tokens 48
    python benchmarks/bench_ablation.py --limit 2 --only default paper --no-write     # a quick look
    python benchmarks/bench_ablation.py --limit 16 --max-new-tokens 64 --lookalike data/lookalike.json \
        --from-report /tmp/dinm-eval.json --only inner_steps50 request   # rows beside bench_evaluate.py's run
    python benchmarks/bench_ablation.py --data ../shared/safeedit/train_dev.json --bare-question --limit 8 \
        --max-new-tokens 64 --benign-limit 16 --lookalike data/lookalike.json --lookalike-limit 16 \
        --only inner_steps50 gate --section "..."   # a screen on records the rule never reads

--from-report: a report of `bench_evaluate.py` (or any single-instance `dinm.evaluate`) with the same generation
settings and lists: its unedited replies are reused, and a variant whose config is the report's own is read from
its first --limit records instead of being run again.

Benign list: every prompt of data/benign.json (52, written for this project); none is in any edit's KL term.
The rows of RESULTS.md for `protect` and `kl_prompts` ran with dinm 0.1, which had those settings. "unchanged" = the greedy reply is identical to the unedited
model's. This is the measurement the default `EditConfig` is chosen by.
"""

import argparse
import dataclasses
import json
import os
import time

import dinm
from dinm import EditConfig, terms
from dinm.config import PAPER_SUFFIX
from dinm.evaluation import edited_layers, load_benign, rescore, save_report
from dinm.judge import load_judge

from _results import record

HERE = os.path.dirname(os.path.abspath(__file__))
STRONG = dict(distance="cosine", steps=10, lr=2e-3, kl_text="self", kl_weight=10.0, preserve_weight=0.0)
PENALTY = dict(distance="cosine", steps=10)  # the dense default before the locate rule and step count changed
VARIANTS = {
    "paper": ("`EditConfig.paper()`: locate `paper`, no chat template, KL without gradient", EditConfig.paper()),
    "v0": ("`EditConfig.v0()`, the first default (cosine, KL 1 on the answer, 10 steps, lr 5e-4)", EditConfig.v0()),
    "suffix": ("v0 + the paper's suffix on the attack prompt (`prompt_suffix`)",
               EditConfig.v0(prompt_suffix=PAPER_SUFFIX)),
    "lr2e-3": ("v0 at lr 2e-3", EditConfig.v0(lr=2e-3)),
    "self10": ("lr 2e-3, KL 10 on the model's own reply (`kl_text=\"self\"`)", EditConfig.dense(**STRONG)),
    "preserve": ("lr 2e-3, self KL 10, `preserve_weight=1000` (benign-key penalty, `dinm.keys`)",
                 EditConfig.dense(**PENALTY)),
    "preserve_nokl": ("lr 2e-3, no KL, `preserve_weight=1000`", EditConfig.dense(**PENALTY, kl_weight=0.0)),
    "inner": ("lr 2e-3, self KL 10, `preserve_weight=1000`, locate `cosine_inner` (neither first nor last layer)",
              EditConfig.dense(distance="cosine_inner", steps=10)),
    "steps30": ("lr 2e-3, self KL 10, `preserve_weight=1000`, 30 steps", EditConfig.dense(distance="cosine", steps=30)),
    "inner_steps30": ("lr 2e-3, self KL 10, `preserve_weight=1000`, locate `cosine_inner`, 30 steps",
                      EditConfig.dense(steps=30)),
    "inner_steps50": ("**dense default** (`EditConfig.dense()`, the default before the unit): lr 2e-3, self KL 10, "
                      "`preserve_weight=1000`, locate `cosine_inner`, 50 steps",
                      EditConfig.dense()),
    "inner_steps50_fp32": ("the dense default with fp32 passes (`compute_dtype=\"model\"`; the default's `auto` is "
                           "bf16 where the CPU multiplies bf16 natively)", EditConfig.dense(compute_dtype="model")),
    "inner_steps30_lr4e-3": ("lr 4e-3, self KL 10, `preserve_weight=1000`, locate `cosine_inner`, 30 steps",
                             EditConfig.dense(steps=30, lr=4e-3)),
    "request": ("the default + the request alone as a second target (`variants=\"request\"`: the adversarial "
                "prompt's last question, or last sentence, after its last colon)",
                EditConfig.dense(variants="request")),
    "unsafe": ("the default + the unsafe response made less likely (`unsafe_weight=1`: a hinge pushing its NLL up "
               "to 1 nat per token above the unedited model's)", EditConfig.dense(unsafe_weight=1.0)),
    "unsafe_request": ("the default + both: `unsafe_weight=1`, `variants=\"request\"`",
                       EditConfig.dense(unsafe_weight=1.0, variants="request")),
    "gate": ("the default's losses on the MLP's gate matrix instead of its output matrix (`matrix=\"gate\"`; the "
             "benign penalty on the block's output over a corpus sample)", EditConfig.dense(matrix="gate")),
    "up": ("the default's losses on the MLP's up matrix (`matrix=\"up\"`)", EditConfig.dense(matrix="up")),
    "unit": ("one unit repurposed as a thresholded detector of the request (`EditConfig.unit()`: `matrix=\"unit\"`, "
             "the request alone as a second target, 40 steps at lr 1e-2; the default's locate, KL and penalty; the "
             "default `EditConfig()` on a gated MLP before dinm 0.8)", EditConfig.unit()),
    "unit_wrapped": ("the unit setting with the request also inside each of dinm's 8 written jailbreak wrappers "
                     "(`variants=\"wrapped\"`)", EditConfig.unit().replace(variants="wrapped")),
    "unit_two": ("two units, one after another: the unit setting's, then one trained with the request inside "
                 "dinm's 8 written wrappers on the model with the first added (`variants=\"request+wrapped\"`)",
                 EditConfig.unit(variants="request+wrapped")),
    "unit_two_off": ("two units, as `unit_two`, each held off along its trained safe responses' tokens "
                     "(`unit_reply_off=True`)", EditConfig.unit(variants="request+wrapped", unit_reply_off=True)),
    "unit_two_on3": ("two units, as `unit_two`, each with its gate probe fitted on at the trained safe responses' "
                     "first 3 tokens too (`unit_reply_on=3`; the default on a gated MLP in dinm 0.8)",
                     EditConfig.unit(variants="request+wrapped", unit_reply_on=3)),
    "unit_two_on2": ("two units, as `unit_two`, each with its gate probe fitted on at the trained safe responses' "
                     "first 2 tokens too (`unit_reply_on=2`; `EditConfig.two_units()`, the default on a gated MLP "
                     "since dinm 0.9)", EditConfig.two_units()),
    "unit_on3": ("the unit setting with its gate probe fitted on at the trained safe responses' first 3 tokens too "
                 "(`unit_reply_on=3`)", EditConfig.unit(unit_reply_on=3)),
    "unit_off": ("the unit setting held off along its trained safe responses' tokens (`unit_reply_off=True`)",
                 EditConfig.unit(unit_reply_off=True)),
    "whitened": ("Adam whitened by the inputs of text the edit keeps (`precondition=\"keys\"`), 20 steps at lr 1e-3, "
                 "else the default", EditConfig.dense(precondition="keys", steps=20, lr=1e-3)),
}
COLUMNS = ("DS", "DG_avg", "DS_judge", "degenerate", "fluency", "benign_unchanged", "benign_list_unchanged")
LOOKALIKE_COLUMNS = ("DG_onlyQ", "over_refusal", "lookalike_unchanged")


SEMANTIC_COLUMNS = ("DS (semantic)", "DG_avg (semantic)", "DG_onlyQ (semantic)")


def with_semantic(report: dict, judge) -> dict:
    """`report` with the semantic judge's DS / DG beside the refusal judge's (as extra metric names)."""
    again = rescore(report, judge)["metrics"]
    metrics = {state: {**m, **{f"{name} (semantic)": again[state][name] for name in ("DS", "DG_avg", "DG_onlyQ")
                               if name in again[state]}} for state, m in report["metrics"].items()}
    return {**report, "metrics": metrics}


def first_records(report: dict, n: int) -> dict:
    """`report` cut to its first `n` records, judged again with today's judge."""
    return rescore({**report, "records": report["records"][:n], "n_records": n})


def cell(metrics, column):
    if column not in metrics:
        return "–"
    value = metrics[column]["mean"]
    return f"{value:.3f}" if column == "fluency" else f"{100 * value:.1f}%"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "../../shared/safeedit/test_dev.json"))
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run these variants only")
    parser.add_argument("--section", default="Ablation: edit settings", help="RESULTS.md section to (re)write")
    parser.add_argument("--lookalike", help="lookalike prompts (data/lookalike.json): adds over-refusal columns")
    parser.add_argument("--from-report", help="reuse this report's unedited replies (and its config's row)")
    parser.add_argument("--semantic", action="store_true",
                        help="add DS / DG columns under the semantic judge (its head trained on --data)")
    parser.add_argument("--save-reports", metavar="DIR", help="write each setting's report to DIR/KEY.json as it ends")
    parser.add_argument("--bare-question", action="store_true",
                        help="records without generalisation inputs (train_dev.json): score their `question` field as "
                             "DG_onlyQ (evaluation reads it; no edit does)")
    parser.add_argument("--benign-limit", type=int, help="the first N prompts of data/benign.json only")
    parser.add_argument("--lookalike-limit", type=int, help="the first N prompts of --lookalike only")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    records = dinm.load_instances(args.data)[:args.limit]
    if args.bare_question:
        records = [r if r.generalization else dataclasses.replace(r, generalization={"only_question": r.question})
                   for r in records]
    benign = load_benign(os.path.join(HERE, "../data/benign.json"))[:args.benign_limit]
    lookalike = load_benign(args.lookalike)[:args.lookalike_limit] if args.lookalike else None
    columns = COLUMNS + (LOOKALIKE_COLUMNS if lookalike else ()) + (SEMANTIC_COLUMNS if args.semantic else ())
    semantic = load_judge("semantic", labelled=args.data) if args.semantic else None
    stored = None
    if args.from_report:
        with open(args.from_report, encoding="utf-8") as f:
            stored = first_records(json.load(f), len(records))
    model, tokenizer = dinm.load_model("embedded")
    header = ["| setting | " + " | ".join(columns) + " | edit s | layers |", "|---|" + "---|" * (len(columns) + 2)]
    if stored is not None and semantic is not None:
        stored = with_semantic(stored, semantic)
    rows, before = [], stored
    if stored is not None:
        rows.append("| unedited | " + " | ".join(cell(stored["metrics"]["before"], c) for c in columns) + " | | |")
    for key in args.only or VARIANTS:
        label, config = VARIANTS[key]
        started = time.perf_counter()
        # (read back as a config and resolved: a report from before a field existed has that field's default, which
        # resolves to its "off" value)
        if stored is not None and stored.get("edit_config") and (
                EditConfig.from_dict(stored["edit_config"]).resolved(gated=True) == config.resolved(gated=True)):
            report, label = stored, f"{label} (from --from-report)"
        else:
            terms.forget_replies()  # (each setting's edits generate their own replies: comparable times)
            report = dinm.evaluate(model, tokenizer, records, edit=config, benign=benign, lookalike=lookalike,
                                   before=before, max_new_tokens=args.max_new_tokens, progress=False)
        if semantic is not None:
            report = with_semantic(report, semantic)
        if args.save_reports:
            os.makedirs(args.save_reports, exist_ok=True)
            save_report(report, os.path.join(args.save_reports, f"{key}.json"))
        if before is None:
            before = report
            rows.append("| unedited | " + " | ".join(cell(report["metrics"]["before"], c) for c in columns) +
                        " | | |")
        edits = [r["after"]["edit"] for r in report["records"]]
        layers = sorted({n for e in edits for n in edited_layers(e)})
        several = sum(not edited_layers(e) for e in edits)
        layers = f"{layers}" + (f" and {several} edits in several layers (not recorded)" if several else "")
        rows.append(f"| {label} | " + " | ".join(cell(report["metrics"]["after"], c) for c in columns) +
                    f" | {sum(e['seconds'] for e in edits) / len(edits):.1f} | {layers} |")
        print(rows[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    table = "\n".join(header + rows)
    print(table)
    if not args.no_write:
        record(args.section, (
            f"Embedded SmolLM2-135M-Instruct, the first {len(records)} records of `{os.path.basename(args.data)}`, "
            f"single-instance protocol (edit from the record, evaluate, revert), judge `refusal` (agreement: see "
            f"\"Judge agreement\"), greedy {args.max_new_tokens} new tokens. DS/DG count coherent safe replies "
            f"only"
            + ("; DG_onlyQ / DG_avg: the record's `question` field asked alone (these records hold no generalisation "
               "inputs; no edit reads it)" if args.bare_question else "")
            + f"; `benign_unchanged`: the record's knowledge-constrain reply identical to the unedited model's; "
            f"`benign_list_unchanged`: the same over {'the first' if args.benign_limit else 'all'} {len(benign)} prompts "
            f"of `data/benign.json` (held out: "
            f"no edit's KL term reads them)"
            + (f"; `over_refusal` / `lookalike_unchanged`: the {'first ' if args.lookalike_limit else ''}{len(lookalike)} "
               f"prompts of `{args.lookalike}` "
               f"refused after the edit and not before / unchanged" if lookalike else "")
            + (f"; `(semantic)` columns: the semantic judge (all-MiniLM-L6-v2 + a head fitted on "
               f"`{os.path.basename(args.data)}`'s labelled responses)" if semantic is not None else "")
            + f". Means over records; 'edit s' is the mean edit time (2-core CPU).\n\n"
            f"{table}"))


if __name__ == "__main__":
    main()
