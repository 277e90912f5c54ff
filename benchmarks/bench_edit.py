"""Wall time of `dinm.edit` (locate and edit separately) on the embedded model, per SafeEdit record.

    python benchmarks/bench_edit.py --data ../shared/safeedit/test_dev.json --limit 8

The reference implementation's figures on the same model and CPU (../shared/REFERENCE_NOTES.md) are 0.65 s
per locate and 11.3 s per edit (10 steps, 234 input tokens on average).
"""

import argparse
import resource
import statistics
import time

import dinm
from dinm.text import encode_pair

from _results import record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/safeedit/test_dev.json")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    instances = dinm.load_instances(args.data)[: args.limit]
    model, tok = dinm.load_model("embedded")
    config = dinm.EditConfig()
    rows = ["| record | layer | tokens (attack+safe, benign) | locate s | edit s | NLL first -> last |",
            "|---|---|---|---|---|---|"]
    locate_s, edit_s, tokens = [], [], []
    for inst in instances:
        n = len(encode_pair(tok, inst.prompt, inst.safe).ids) + len(encode_pair(tok, inst.benign_prompt,
                                                                                inst.benign_answer).ids)
        start = time.perf_counter()
        delta = dinm.edit(model, tok, inst, config, progress=False)
        total = time.perf_counter() - start
        t = delta.summary()["seconds"]
        locate_s.append(t["locate"])
        edit_s.append(total - t["locate"])
        tokens.append(n)
        h = delta.history
        rows.append(f"| {inst.id} | {delta.layer} | {n} | {t['locate']:.2f} | {total - t['locate']:.2f} | "
                    f"{h[0]['nll']:.2f} -> {h[-1]['nll']:.2f} |")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body = (f"`dinm.edit` with the default `EditConfig` ({config.steps} steps, fp32, full forward per step), "
            f"SmolLM2-135M-Instruct, {len(instances)} records of `{args.data}`.\n\n" + "\n".join(rows) +
            f"\n\nmean: locate {statistics.mean(locate_s):.2f} s, edit {statistics.mean(edit_s):.2f} s at "
            f"{statistics.mean(tokens):.0f} tokens per step on average; peak RSS {peak_mb:.0f} MB.")
    print(body)
    if not args.no_write:
        record("Edit: wall time per record (default config)", body)


if __name__ == "__main__":
    main()
