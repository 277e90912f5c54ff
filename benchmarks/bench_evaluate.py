"""The SafeEdit evaluation of dinm's default edit on the embedded model, single-instance protocol, plus the
measurements the evaluator's defaults rest on: the judges' agreement with labelled texts and the
degenerate-reply threshold.

    python benchmarks/bench_evaluate.py --data ../shared/safeedit/test_dev.json --limit 44 \
        --report /tmp/dinm-eval.json

1. Judge agreement: the offline `refusal` judge (and its simpler variants) on SafeEdit's labelled
   "safe generation" / "unsafe generation" texts of every file given with --labelled; the `semantic` judge
   trained on each file and tested on the others; and, when benchmarks/judge_labels.json exists, both on the
   embedded model's own replies labelled by hand.
2. Degenerate replies: the trigram repetition of SafeEdit's coherent texts (the threshold must sit above it).
3. `dinm.evaluate(..., edit=True)`: DS / DG / fluency / benign retention / over-refusal of lookalike prompts,
   before and after, under both judges (the semantic one trained on --data), against issue 19's targets.
"""

import argparse
import hashlib
import json
import os
import time

import numpy as np

import dinm
from dinm.evaluation import edited_layers, load_benign, merge_reports, rescore, save_report
from dinm.judge import RefusalJudge, load_judge
from dinm.metrics import Degeneracy, longest_letter_run, repetition, words

from _report import SINGLE_TARGETS, both_judges, judges_table, targets_table
from _results import layers_label, record

HERE = os.path.dirname(os.path.abspath(__file__))
HAND_LABELS = os.path.join(HERE, "judge_labels.json")


def reply_key(record_id: str, state: str, name: str, reply: str) -> str:
    return f"{record_id}/{state}/{name}/{hashlib.sha256(reply.encode()).hexdigest()[:12]}"


def judge_agreement(paths: list[str]) -> str:
    variants = {"refusal (shipped: opening refusal, every speaker refuses, no 'here is how' after)": RefusalJudge(),
                "opening refusal only": RefusalJudge(speakers=False, pivot=False),
                "opening refusal + every speaker": RefusalJudge(pivot=False)}
    rows = ["| judge | texts | safe judged safe | unsafe judged unsafe | agreement |", "|---|---|---|---|---|"]
    for path in paths:
        with open(path, encoding="utf-8") as f:
            recs = json.load(f)
        safe = [r["safe generation"] for r in recs]
        unsafe = [r["unsafe generation"] for r in recs]
        for name, judge in variants.items():
            s = sum(judge.safe(t) for t in safe)
            u = sum(not judge.safe(t) for t in unsafe)
            rows.append(f"| {name} | {os.path.basename(path)} ({len(safe)}+{len(unsafe)}) | {s}/{len(safe)} | "
                        f"{u}/{len(unsafe)} | {100 * (s + u) / (len(safe) + len(unsafe)):.1f}% |")
        for train in paths:
            judge = load_judge("semantic", labelled=train)
            s, u = sum(judge([], safe)), sum(not v for v in judge([], unsafe))
            where = "in-sample" if train == path else "held out"
            rows.append(f"| semantic, head trained on {os.path.basename(train)} ({where}) | {os.path.basename(path)} "
                        f"({len(safe)}+{len(unsafe)}) | {s}/{len(safe)} | {u}/{len(unsafe)} | "
                        f"{100 * (s + u) / (len(safe) + len(unsafe)):.1f}% |")
    return "\n".join(rows)


def hand_agreement(report: dict, judge, name: str) -> str:
    """How `judge` agrees with the hand labels of this run's replies (those found in it)."""
    if not os.path.exists(HAND_LABELS):
        return "No hand labels (benchmarks/judge_labels.json) yet."
    with open(HAND_LABELS, encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    found = [(labels[key], entry["reply"]) for rec in report["records"] for state in ("before", "after")
             for key, entry in ((reply_key(rec["id"], state, n, e["reply"]), e)
                                for n, e in rec.get(state, {}).items() if isinstance(e, dict) and "judge_safe" in e)
             if key in labels]
    if not found:
        return f"{name}: the hand-labelled replies were not among this run's replies (different model or settings)."
    verdicts = judge([""] * len(found), [reply for _, reply in found])
    confusion: dict = {}
    for (mine, _), its in zip(found, verdicts):
        confusion[(mine, bool(its))] = confusion.get((mine, bool(its)), 0) + 1
    agree = confusion.get((True, True), 0) + confusion.get((False, False), 0)
    cells = ", ".join(f"hand {'safe' if a else 'unsafe'} / judge {'safe' if b else 'unsafe'}: {n}"
                      for (a, b), n in sorted(confusion.items()))
    judged_safe = confusion.get((True, True), 0) + confusion.get((False, True), 0)
    truly_safe = confusion.get((True, True), 0) + confusion.get((True, False), 0)
    return (f"{name}: on {len(found)} of the embedded model's replies labelled by hand, agreement "
            f"{100 * agree / len(found):.1f}% ({cells}); of the replies it calls safe, "
            f"{confusion.get((True, True), 0)}/{judged_safe} are safe by hand; of those safe by hand it finds "
            f"{confusion.get((True, True), 0)}/{truly_safe}.")


def hand_agreements(report: dict, data: str) -> str:
    return "\n\n".join(hand_agreement(report, judge, name) for judge, name in [
        (RefusalJudge(), "`refusal` judge"),
        (load_judge("semantic", labelled=data), f"`semantic` judge (head trained on {os.path.basename(data)})")])


def judge_section(agreement: str, hand: str, report: dict) -> str:
    return (f"{agreement}\n\nHand labels, on the replies of a `{report['protocol']}`-protocol run "
            f"({report['n_records']} records, {report['generation']['max_new_tokens']} new tokens):\n\n{hand}\n\n"
            f"The rules were written by hand, not fitted; the speaker and pivot rules were added after reading the 7 "
            f"unsafe texts that the opening-refusal rule let through in these same files, so the shipped row is "
            f"in-sample. The semantic judge's head is fitted at run time on the file named in its row (nothing "
            f"trained ships); its held-out rows are the honest ones.")


def degenerate_threshold(paths: list[str], reports: dict) -> str:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            texts += [r[k] for r in json.load(f) for k in ("safe generation", "unsafe generation")]
    rep = np.array([repetition([t.lower() for t in words(x)]) for x in texts])
    rep60 = np.array([repetition([t.lower() for t in words(x)][:60]) for x in texts])
    runs = np.array([longest_letter_run(x) for x in texts])
    reasons = {}
    for rec in reports["records"]:
        for state in ("before", "after"):
            for entry in rec.get(state, {}).values():
                if isinstance(entry, dict) and "degenerate" in entry:
                    reasons.setdefault(state, []).append(entry["degenerate"])
    counts = {s: {k: v.count(k) for k in ("empty", "repetition", "gibberish")} | {"of": len(v)}
              for s, v in reasons.items()}
    d = Degeneracy()
    return (f"Share of repeated word trigrams in SafeEdit's {len(texts)} labelled texts (all coherent): "
            f"max {rep.max():.3f}, 99th percentile {np.percentile(rep, 99):.3f}, median {np.median(rep):.3f}; "
            f"over their first 60 tokens (about a 64-token reply) max {rep60.max():.3f}. "
            f"Threshold `max_repetition` = {d.max_repetition} (a reply above it is a repetition loop); "
            f"`min_words` = {d.min_words}, `min_letters` = {d.min_letters}, `max_char_run` = {d.max_char_run}. "
            f"Longest run of letters without a space, digit or mark in those texts: {runs.max()} (99th percentile "
            f"{np.percentile(runs, 99):.0f}); threshold `max_letter_run` = {d.max_letter_run} (a longer run is words "
            f"run together: gibberish).\n\n"
            f"Degenerate replies to the safety inputs in this run: {json.dumps(counts)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/safeedit/test_dev.json")
    parser.add_argument("--labelled", nargs="*",
                        default=["../shared/safeedit/test_dev.json", "../shared/safeedit/train_dev.json"])
    parser.add_argument("--limit", type=int, default=44)
    parser.add_argument("--records", metavar="START:END",
                        help="only these records of --data (a Python slice of the first --limit), e.g. to run a long "
                        "evaluation in parts and join the reports with --merge")
    parser.add_argument("--merge", nargs="+", metavar="REPORT",
                        help="join these reports of consecutive parts (dinm.evaluation.merge_reports) into --report "
                        "and judge it, instead of generating")
    parser.add_argument("--benign", default=os.path.join(HERE, "..", "data", "benign.json"))
    parser.add_argument("--lookalike", default=os.path.join(HERE, "..", "data", "lookalike.json"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--report", default="/tmp/dinm-eval.json", help="where to keep the full JSON report")
    parser.add_argument("--reuse", action="store_true", help="re-judge the replies stored in --report instead of generating them again")
    parser.add_argument("--before", help="reuse the unedited replies of this report (same records, lists and "
                        "generation settings; e.g. bench_batch.py's) instead of generating them again")
    parser.add_argument("--judges-only", action="store_true",
                        help="only the judge agreement, on the replies stored in --report (any dinm.evaluate report)")
    parser.add_argument("--keep-judge-section", action="store_true",
                        help="leave RESULTS.md's judge agreement as it is (written from a report with more hand labels)")
    parser.add_argument("--section", default="SafeEdit evaluation, embedded model, single-instance edit",
                        help="RESULTS.md section to (re)write with the evaluation")
    parser.add_argument("--note", default="", help="a sentence for RESULTS.md (how the parts of a --merge were made)")
    parser.add_argument("--shared-cpu", action="store_true", help="say in RESULTS.md that other work ran beside it")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    agreement = judge_agreement(args.labelled)
    print(agreement)
    if args.judges_only:
        with open(args.report, encoding="utf-8") as f:
            report = json.load(f)
        hand = hand_agreements(report, args.data)
        print(hand)
        if not args.no_write:
            record("Judge agreement", judge_section(agreement, hand, report))
        return
    part = slice(*(int(x) if x else None for x in args.records.split(":"))) if args.records else slice(None)
    if args.merge:
        parts = []
        for path in args.merge:
            with open(path, encoding="utf-8") as f:
                parts.append(json.load(f))
        report = merge_reports(parts)
        save_report(report, args.report)
    elif args.reuse:
        with open(args.report, encoding="utf-8") as f:
            report = json.load(f)  # (judged again below, with today's judges and degeneracy rules)
    else:
        instances = dinm.load_instances(args.data)[:args.limit][part]
        before = None
        if args.before:
            with open(args.before, encoding="utf-8") as f:
                before = rescore(json.load(f))  # (judged with today's degeneracy rules, as `evaluate` checks)
            before["records"] = before["records"][:args.limit][part]
        model, tokenizer = dinm.load_model("embedded")
        started = time.perf_counter()
        report = dinm.evaluate(model, tokenizer, instances, edit=True, benign=load_benign(args.benign),
                               lookalike=load_benign(args.lookalike), max_new_tokens=args.max_new_tokens,
                               before=before)
        report["wall_seconds"] = time.perf_counter() - started
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    refusal, semantic = both_judges(report, args.data)
    table = judges_table(refusal, semantic)
    targets = targets_table(refusal, semantic, SINGLE_TARGETS)
    hand = hand_agreements(report, args.data)
    degenerate = degenerate_threshold(args.labelled, refusal)  # (today's degeneracy rules)
    print(table, targets, hand, degenerate, sep="\n\n")
    if args.no_write:
        return
    if not args.keep_judge_section:
        record("Judge agreement", judge_section(agreement, hand, report))
    record("Degenerate replies", degenerate)
    # (a patch of units in several layers: "20+22"; -1: several layers, not recorded by an older report)
    layers = [layers_label(edited_layers(r["after"]["edit"])) or "-1" for r in report["records"]]
    edits = [r["after"]["edit"]["seconds"] for r in report["records"]]
    order = sorted(set(layers), key=lambda s: [int(n) for n in s.split("+")])
    counts = {layer: layers.count(layer) for layer in order}
    parts = " + ".join(map(str, report.get("merged_from", [])))
    joined = (f"Joined with `--merge` from reports of parts of one evaluation ({parts} records, in order; "
              f"{', '.join(os.path.basename(p) for p in args.merge)}): same edit config, judge, "
              f"generation settings, lists and unedited replies, checked by `dinm.evaluation.merge_reports`. "
              if args.merge else "")
    record(args.section, joined + (
        f"{report['n_records']} records of `{os.path.basename(args.data)}`, default `EditConfig` "
        f"(`{json.dumps(report['edit_config'], sort_keys=True)}`), greedy "
        f"{report['generation']['max_new_tokens']} new tokens, chat template, the same prompts before and after; "
        f"benign list: {len(report['benign_prompts'])} prompts of data/benign.json; lookalike list: "
        f"{len(report['lookalike_prompts'])} prompts of data/lookalike.json. Two judges: `refusal` (rules) and "
        f"`semantic` (all-MiniLM-L6-v2 + a logistic head trained on {os.path.basename(args.data)}'s labelled "
        f"responses). Mean [95% bootstrap interval over records]. DS/DG count a reply only if judged safe and not "
        f"degenerate; `*_judge` are the judge alone; `over_refusal`: lookalike replies refused after the edit and "
        f"not before (refusal rules, whatever the judge); `lookalike_unchanged`: identical replies.\n\n{table}"
        f"\n\nAgainst the targets of issue 19 (single-instance protocol):\n\n{targets}\n\n"
        f"Layers edited: {counts}. " + (timing(report, args) if not args.merge else (
            f"Edit time per record (each record's own measurement): mean {np.mean(edits):.1f} s, "
            f"{min(edits):.1f}-{max(edits):.1f} s; the parts' wall times are their own (below)"
            + ("; part of the run shared the 2 cores with other work, so these times are upper bounds."
               if args.shared_cpu else "."))) + (f"\n\n{args.note}" if args.note else "")))


def timing(report: dict, args) -> str:
    s = report["seconds"]
    return (f"Wall time: {s['total']:.0f} s in all, {s['per_record']:.1f} s per record (of which edit "
            f"{s['edit'] / report['n_records']:.1f} s; "
            + (f"the unedited replies reused from `{os.path.basename(args.before)}`)" if args.before else
               f"generating the unedited replies once {s['before']:.0f} s)")
            + ("; part of the run shared the 2 cores with other work, so these times are upper bounds."
               if args.shared_cpu else "; nothing else ran on the machine."))


if __name__ == "__main__":
    main()
