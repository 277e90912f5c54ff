"""Sequential editing: edit after edit on the first N records, each delta applied on top of the last (stacked),
measuring after every edit what all edits so far still do and what they changed.

    python benchmarks/bench_sequential.py --limit 8 --benign 16
    python benchmarks/bench_sequential.py --limit 8 --name strong --config '{"lr": 2e-3}'

After edit k (the k-th record edited on the model that already holds edits 1..k-1), one batched greedy pass over
every record's prompts and the benign list gives: DS and DG_avg over the records edited so far (does an early
edit survive the later ones?), DS over the records not edited yet (does the edit generalise to other attacks?),
and the share of benign replies (the records' knowledge-constrain prompts and the list) identical to the
unedited model's. At the end the deltas are reverted in reverse order and the weights checked bit for bit.
"""

import argparse
import json
import os
import statistics
import time

import dinm
from dinm import EditConfig
from dinm.delta import fingerprint
from dinm.evaluation import DG_NAMES, load_benign

from _results import layers_label, record

HERE = os.path.dirname(os.path.abspath(__file__))


def state(model, tok, records, benign, tokens):
    """Replies and verdicts of the model as it is now (no edit of its own: `evaluate` without a delta)."""
    report = dinm.evaluate(model, tok, records, benign=benign, max_new_tokens=tokens, progress=False)
    recs = [r["before"] for r in report["records"]]
    return recs, [b["before"] for b in report["benign_prompts"]]


def mean(values):
    return statistics.mean(values) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "../../shared/safeedit/test_dev.json"))
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--benign", type=int, default=16, help="first M prompts of data/benign.json")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--name", default="default")
    parser.add_argument("--config", default="{}", help="EditConfig fields as JSON")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    config = EditConfig(**json.loads(args.config))
    changed = {k: v for k, v in config.to_dict().items() if v != getattr(EditConfig(), k)}

    model, tok = dinm.load_model("embedded")
    records = dinm.load_instances(args.data)[:args.limit]
    benign = load_benign(os.path.join(HERE, "../data/benign.json"))[:args.benign]
    originals = {name: fingerprint(p) for name, p in model.named_parameters()}

    recs0, list0 = state(model, tok, records, benign, args.max_new_tokens)
    rows = ["| after edit | layer | edit s | DS edited | DG_avg edited | DS not yet edited | benign (records) "
            "unchanged | benign list unchanged |", "|---|---|---|---|---|---|---|---|"]

    def row(k, layer, seconds, recs, replies):
        dg = [statistics.mean(float(r[n]["safe"]) for n in DG_NAMES.values() if n in r) for r in recs[:k]]
        same_rec = [a["benign"]["reply"] == b["benign"]["reply"] for a, b in zip(recs, recs0)]
        same_list = [a == b for a, b in zip(replies, list0)]
        cells = [f"{100 * mean([float(r['DS']['safe']) for r in recs[:k]]):.0f}%" if k else "–",
                 f"{100 * mean(dg):.0f}%" if k else "–",
                 f"{100 * mean([float(r['DS']['safe']) for r in recs[k:]]):.0f}%" if k < len(recs) else "–",
                 f"{100 * mean(same_rec):.0f}%", f"{100 * mean(same_list):.0f}%"]
        rows.append(f"| {k} | {layer} | {seconds} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)

    row(0, "–", "–", recs0, list0)
    deltas = []
    for k, inst in enumerate(records, 1):
        started = time.perf_counter()
        delta = dinm.edit(model, tok, inst, config, progress=False)
        seconds = time.perf_counter() - started
        delta.apply(model)
        deltas.append(delta)
        row(k, layers_label(delta.layers), f"{seconds:.1f}",
            *state(model, tok, records, benign, args.max_new_tokens))
    for delta in reversed(deltas):
        delta.revert(model)
    exact = all(fingerprint(p) == originals[name] for name, p in model.named_parameters())
    size = sum(d.nbytes for d in deltas)
    layers = sorted({n for d in deltas for n in d.layers})
    footer = (f"Deltas: {len(deltas)}, {size / 1e6:.1f} MB together, layers edited {layers}; reverted in reverse "
              f"order: weights {'bit-identical to the original' if exact else 'NOT identical to the original'}.")
    print(footer)
    if not args.no_write:
        record(f"Sequential editing ({args.name})", (
            f"Embedded SmolLM2-135M-Instruct, the first {len(records)} records of `{os.path.basename(args.data)}` "
            f"edited one after another, each delta applied on top of the previous ones; `EditConfig` "
            f"`{json.dumps(changed)}`"
            f" (changes from the default). Judge `refusal`, greedy {args.max_new_tokens} new tokens; "
            f"DS/DG count coherent safe replies; benign list = the first {len(benign)} prompts of "
            f"`data/benign.json`; \"unchanged\" = identical to the unedited model's reply.\n\n"
            + "\n".join(rows) + "\n\n" + footer))
    if not exact:
        raise SystemExit("stacked deltas did not revert to the original weights")


if __name__ == "__main__":
    main()
