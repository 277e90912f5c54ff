"""How often `dinm.instance.request_of` (what `variants="request"` trains) reads SafeEdit's own `question` out of the
adversarial prompt. The `question` field is read here only to score the reader; no edit ever reads it (it is what
DG_onlyQ measures).

    python benchmarks/bench_request.py ../shared/safeedit/train_dev.json ../shared/safeedit/test_dev.json

Counts only: no SafeEdit text is written to RESULTS.md (CC BY-NC-SA).
"""

import argparse
import json
import os

from dinm.instance import request_of

from _results import record


def score(path: str) -> dict:
    """Per outcome, the number of records: the question exactly; a longer text that holds it; none; other."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    counts = {"exact": 0, "holds it": 0, "none": 0, "other": 0}
    for rec in records:
        question, got = rec["question"].strip(), request_of(rec["adversarial prompt"])
        counts["none" if got is None else "exact" if got == question else "holds it" if question in got
               else "other"] += 1
    return {"records": len(records), **counts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = ["| file | records | the question exactly | a longer text holding it | none found | other |",
            "|---|---|---|---|---|---|"]
    for path in args.files:
        s = score(path)
        rows.append(f"| `{os.path.basename(path)}` | {s['records']} | {s['exact']} | {s['holds it']} | {s['none']} "
                    f"| {s['other']} |")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        record("The request read from the adversarial prompt", (
            "What `request_of` reads from each record's adversarial prompt, against the record's `question` field "
            "(read here only to score it; the edit never reads it).\n\n" + table))


if __name__ == "__main__":
    main()
