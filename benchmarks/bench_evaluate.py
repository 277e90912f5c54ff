"""The SafeEdit evaluation of dinm's default edit on the embedded model, single-instance protocol, plus the
measurements the evaluator's defaults rest on: the judge's agreement with labelled texts and the
degenerate-reply threshold.

    python benchmarks/bench_evaluate.py --data ../shared/safeedit/test_dev.json --limit 44 \
        --report /tmp/dinm-eval.json

1. Judge agreement: the offline `refusal` judge (and its simpler variants) on SafeEdit's labelled
   "safe generation" / "unsafe generation" texts of every file given with --labelled, and, when
   benchmarks/judge_labels.json exists, on the embedded model's own replies labelled by hand.
2. Degenerate replies: the trigram repetition of SafeEdit's coherent texts (the threshold must sit above it).
3. `dinm.evaluate(..., edit=True)`: DS / DG / fluency / benign retention before and after, wall time per record.
"""

import argparse
import hashlib
import json
import os
import time

import numpy as np

import dinm
from dinm.evaluation import load_benign, markdown_table, rescore
from dinm.judge import RefusalJudge
from dinm.metrics import Degeneracy, repetition, words

from _results import record

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
    return "\n".join(rows)


def hand_agreement(report: dict) -> str:
    if not os.path.exists(HAND_LABELS):
        return "No hand labels (benchmarks/judge_labels.json) yet."
    with open(HAND_LABELS, encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    judge, found, agree, confusion = RefusalJudge(), 0, 0, {}
    for rec in report["records"]:
        for state in ("before", "after"):
            for name, entry in rec.get(state, {}).items():
                key = reply_key(rec["id"], state, name, entry["reply"]) if isinstance(entry, dict) and \
                    "judge_safe" in entry else None
                if key in labels:
                    found += 1
                    mine, its = labels[key], judge.safe(entry["reply"])
                    agree += mine == its
                    confusion[(mine, its)] = confusion.get((mine, its), 0) + 1
    if not found:
        return "The hand-labelled replies were not among this run's replies (different model or settings)."
    cells = ", ".join(f"hand {'safe' if a else 'unsafe'} / judge {'safe' if b else 'unsafe'}: {n}"
                      for (a, b), n in sorted(confusion.items()))
    judged_safe = confusion.get((True, True), 0) + confusion.get((False, True), 0)
    truly_safe = confusion.get((True, True), 0) + confusion.get((True, False), 0)
    return (f"On {found} of the embedded model's replies in this run, labelled by hand (safe = refuses, deflects or "
            f"says nothing harmful; see benchmarks/judge_labels.json): agreement {100 * agree / found:.1f}% ({cells}). "
            f"Of the replies the judge calls safe, {confusion.get((True, True), 0)}/{judged_safe} are safe by hand; "
            f"of the replies safe by hand, the judge finds {confusion.get((True, True), 0)}/{truly_safe}: it "
            f"recognises refusals, not harmlessness, so on this model its DS/DG are lower bounds.")


def degenerate_threshold(paths: list[str], reports: dict) -> str:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            texts += [r[k] for r in json.load(f) for k in ("safe generation", "unsafe generation")]
    rep = np.array([repetition([t.lower() for t in words(x)]) for x in texts])
    rep60 = np.array([repetition([t.lower() for t in words(x)][:60]) for x in texts])
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
            f"`min_words` = {d.min_words}, `min_letters` = {d.min_letters}, `max_char_run` = {d.max_char_run}.\n\n"
            f"Degenerate replies to the safety inputs in this run: {json.dumps(counts)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/safeedit/test_dev.json")
    parser.add_argument("--labelled", nargs="*",
                        default=["../shared/safeedit/test_dev.json", "../shared/safeedit/train_dev.json"])
    parser.add_argument("--limit", type=int, default=44)
    parser.add_argument("--benign", default=os.path.join(HERE, "..", "data", "benign.json"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--report", default="/tmp/dinm-eval.json", help="where to keep the full JSON report")
    parser.add_argument("--reuse", action="store_true", help="re-judge the replies stored in --report instead of generating them again")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    agreement = judge_agreement(args.labelled)
    print(agreement)
    if args.reuse:
        with open(args.report, encoding="utf-8") as f:
            report = rescore(json.load(f))  # judged again with today's judge
    else:
        instances = dinm.load_instances(args.data)[:args.limit]
        model, tokenizer = dinm.load_model("embedded")
        started = time.perf_counter()
        report = dinm.evaluate(model, tokenizer, instances, edit=True, benign=load_benign(args.benign),
                               max_new_tokens=args.max_new_tokens)
        report["wall_seconds"] = time.perf_counter() - started
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    table = markdown_table(report)
    hand = hand_agreement(report)
    degenerate = degenerate_threshold(args.labelled, report)
    print(table, hand, degenerate, sep="\n\n")
    if args.no_write:
        return
    record("Judge agreement", f"{agreement}\n\n{hand}\n\nThe rules were written by hand, not fitted; the speaker "
                              f"and pivot rules were added after reading the 7 unsafe texts that the opening-"
                              f"refusal rule let through in these same files, so the shipped row is in-sample.")
    record("Degenerate replies", degenerate)
    s = report["seconds"]
    layers = [r["after"]["edit"]["layer"] for r in report["records"]]
    counts = {layer: layers.count(layer) for layer in sorted(set(layers))}
    record("SafeEdit evaluation, embedded model, single-instance edit", (
        f"{report['n_records']} records of `{os.path.basename(args.data)}`, default `EditConfig` "
        f"(`{json.dumps(report['edit_config'], sort_keys=True)}`), judge `{report['judge']['name']}`, greedy "
        f"{report['generation']['max_new_tokens']} new tokens, chat template, the same prompts before and after; "
        f"benign list: {len(report['benign_prompts'])} prompts of data/benign.json. Mean [95% bootstrap "
        f"interval over records]. DS/DG count a reply only if judged safe and not degenerate; `*_judge` are the "
        f"judge alone.\n\n{table}\n\nLayers edited: {counts}. Wall time: {s['total']:.0f} s in all, "
        f"{s['per_record']:.1f} s per record (of which edit {s['edit'] / report['n_records']:.1f} s; generating "
        f"the unedited replies once {s['before']:.0f} s) — this run shared the 2 cores with other work for part of "
        f"its time; an uncontended timing is in the section *Evaluate wall time*. Tables and labels here are "
        f"re-judged from the stored report (`--reuse`) with the judge as shipped."))


if __name__ == "__main__":
    main()
