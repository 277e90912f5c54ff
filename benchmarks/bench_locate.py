"""Which layer each locate rule picks on real SafeEdit records, and what it costs, on the embedded model.

    python benchmarks/bench_locate.py --data ../shared/safeedit/test_dev.json --limit 24
"""

import collections
import statistics
import time

import dinm
from dinm.config import DISTANCES

from _results import arguments, record


def main():
    args = arguments(__doc__, limit=24)

    instances = dinm.load_instances(args.data)[: args.limit]
    model, tok = dinm.load_model("embedded")
    dinm.locate(model, tok, instances[0])  # warm-up
    chosen, seconds = collections.defaultdict(list), collections.defaultdict(list)
    for inst in instances:
        for name in DISTANCES:
            start = time.perf_counter()
            chosen[name].append(dinm.locate(model, tok, inst, name).layer)
            seconds[name].append(time.perf_counter() - start)
    rows = ["| distance | layers chosen (layer: records) | distinct | mean s / locate |", "|---|---|---|---|"]
    for name in DISTANCES:
        counts = ", ".join(f"{layer}: {n}" for layer, n in sorted(collections.Counter(chosen[name]).items()))
        rows.append(f"| `{name}` | {counts} | {len(set(chosen[name]))} | {statistics.mean(seconds[name]):.3f} |")
    body = (f"SmolLM2-135M-Instruct (embedded, fp32, 30 layers), the first {len(instances)} records of "
            f"`{args.data}`.\n\n" + "\n".join(rows))
    print(body)
    if not args.no_write:
        record("Locate: layer chosen by each distance rule", body)


if __name__ == "__main__":
    main()
