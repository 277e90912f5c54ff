"""Detox vs benign retention for edit settings given on the command line, on a few records, with the held-out
benign list; the unedited pass is generated once and reused (`evaluate(before=...)`).

    python benchmarks/bench_tradeoff.py 4 16 '{"default": {}, "strong": {"lr": 2e-3}}'

Arguments: records (first N of test_dev.json), benign prompts (first M of data/benign.json, held out: never in
the KL term), a JSON object of name -> fields over `EditConfig.dense()`.
Prints one line per setting (after-edit means over the records, 48 new tokens, judge `refusal`). Exploratory:
it does not write RESULTS.md.
"""

import json
import os
import sys
import time

import dinm
from dinm import EditConfig
from dinm.evaluation import load_benign

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ("DS", "DG_avg", "DS_judge", "fluency", "benign_unchanged", "benign_list_unchanged")


def main():
    n, nb, variants = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    data = sys.argv[4] if len(sys.argv) > 4 else os.path.join(HERE, "../../shared/safeedit/test_dev.json")
    model, tok = dinm.load_model("embedded")
    records = dinm.load_instances(data)[:n]
    benign = load_benign(os.path.join(HERE, "../data/benign.json"))[:nb]
    before = None
    for name, fields in variants.items():
        started = time.perf_counter()
        report = dinm.evaluate(model, tok, records, edit=EditConfig.dense(**fields), before=before, benign=benign,
                               max_new_tokens=48, progress=False)
        before = before or report
        m = report["metrics"]["after"]
        layers = [r["after"]["edit"].get("layers") or r["after"]["edit"]["layer"] for r in report["records"]]
        print(f"{name:30s}", " ".join(f"{k}={m[k]['mean']:.3f}" for k in COLUMNS), "layers", layers,
              f"{(time.perf_counter() - started) / n:.0f}s/record", flush=True)


if __name__ == "__main__":
    main()
