"""Low-rank edits, measured: how low-rank is the default (dense) edit, what its truncations keep, and how edits
trained at rank r (`EditConfig(rank=r)`) compare with it.

    python benchmarks/bench_lowrank.py --limit 16 --max-new-tokens 48
    python benchmarks/bench_lowrank.py --limit 1 --ranks 1 4 --trained 1 --no-write      # a quick look

Per record of the SafeEdit file (single-instance protocol, the embedded model, fp32):
1. the default edit (dense), its singular values, and for each rank in --ranks the truncated SVD of its update
   (`dinm.lowrank.truncate`) as a factored delta: relative Frobenius error, DS/DG, benign retention;
2. for each rank in --trained, the edit trained at that rank (`EditConfig(rank=r)`): the same figures, seconds, bytes.
Every variant answers the same prompts as the unedited model (generated once per record) and is judged by the same
judge; "unchanged" = the greedy reply is identical to the unedited model's, "as dense" = identical to the dense
edit's. Results per record are kept in --cache (a re-run resumes); the table is means over records with 95%
bootstrap intervals.
"""

import argparse
import json
import os
import time

import torch

import dinm
from dinm import EditConfig
from dinm.evaluation import SAFETY_INPUTS, load_benign, save_report
from dinm.generate import generate
from dinm.lowrank import truncate
from dinm.metrics import summarise

from _results import record

TRAINED = "whitened"  # the factors' start: see `dinm.editing._Factored`
REVERT = (":revert_index", ":revert_value")  # what a bit-exact revert needs beside the update itself
HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "DG_avg", "benign_unchanged",
           "benign_list_unchanged")


def measure(model, tokenizer, inst, delta, before, benign, gen) -> dict:
    """DS/DG and the knowledge reply by `dinm.evaluate` (the record's prompts only, batch 8: they are long), the
    benign list by `generate` in one batch of short prompts (`benign` = (prompts, unedited replies))."""
    report = dinm.evaluate(model, tokenizer, [inst], delta=delta, before=before, progress=False, batch_size=8, **gen)
    after = report["metrics"]["after"]
    prompts, unedited = benign
    with delta.applied(model):
        listed = generate(model, tokenizer, prompts, batch_size=len(prompts), **gen)
    record_after = report["records"][0]["after"]
    fixups = sum(t.numel() * t.element_size() for k, t in delta.tensors.items() if k.endswith(REVERT))
    count = sum(t.numel() for k, t in delta.tensors.items() if k.endswith(REVERT[0]))
    metrics = {k: after[k]["mean"] for k in METRICS if k in after}
    metrics["benign_list_unchanged"] = sum(a == b for a, b in zip(listed, unedited)) / len(listed)
    return {"metrics": metrics, "bytes": delta.nbytes - fixups, "fixup_bytes": fixups, "fixups": count,
            "replies": [record_after[n]["reply"] for n in SAFETY_INPUTS if n in record_after]
            + [record_after["benign"]["reply"]] + listed}


def run_record(model, tokenizer, inst, benign, gen, ranks, evaluated: bool, stem: str) -> dict:
    """The dense edit of one record, its spectrum, and (when `evaluated`) its truncations measured. Keeps the
    dense delta and the unedited report beside `stem` for `run_trained`."""
    started = time.perf_counter()
    dense = dinm.edit(model, tokenizer, inst, EditConfig.dense(), progress=False)
    dense.save(stem + "-dense.safetensors")
    out = {"id": inst.id, "layer": dense.layer, "dense": {"seconds": time.perf_counter() - started,
                                                          "nll_last": dense.history[-1].nll}}
    name = dense.names[0]
    base = model.get_parameter(name).detach()
    d = dense.dense(name).float()
    full = truncate(d, rank=max(ranks))
    squares = full.singular_values.double() ** 2
    out["singular_values"] = full.singular_values[:64].tolist()
    out["energy"] = {r: float(squares[:r].sum() / squares.sum()) for r in ranks}
    out["error"] = {r: truncate(d, rank=r).error for r in ranks}
    if not evaluated:
        return out
    before = dinm.evaluate(model, tokenizer, [inst], progress=False, batch_size=8, **gen)
    save_report(before, stem + "-before.json")
    out["dense"].update(measure(model, tokenizer, inst, dense, before, benign, gen))
    out["truncated"] = {}
    for r in ranks:
        t = truncate(d, rank=r)
        delta = dinm.Delta.from_factors({name: (base, t.up, t.down)}, {"layer": str(dense.layer)})
        out["truncated"][r] = {"error": t.error, **measure(model, tokenizer, inst, delta, before, benign, gen)}
    return out


def run_trained(model, tokenizer, inst, benign, gen, rank: int, stem: str) -> dict:
    """The edit trained at `rank` on the layer the dense edit located, measured like the dense one."""
    if not os.path.exists(stem + "-before.json"):  # (a record measured before these were kept; the edit is seeded)
        dinm.edit(model, tokenizer, inst, EditConfig.dense(), progress=False).save(stem + "-dense.safetensors")
        save_report(dinm.evaluate(model, tokenizer, [inst], progress=False, batch_size=8, **gen), stem + "-before.json")
    dense = dinm.Delta.load(stem + "-dense.safetensors")
    with open(stem + "-before.json", encoding="utf-8") as f:
        before = json.load(f)
    name = dense.names[0]
    d = dense.dense(name).float()
    started = time.perf_counter()
    delta = dinm.edit(model, tokenizer, inst, EditConfig(rank=rank, layer=dense.layer), progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "distance_to_dense": float((delta.dense(name).float() - d).norm() / d.norm()),
            "nll_last": delta.history[-1].nll, **measure(model, tokenizer, inst, delta, before, benign, gen)}


def cached(path: str, compute) -> dict:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    out = json.loads(json.dumps(compute()))  # (int keys become strings, as when read back)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f)
    return out


def same_as(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def cell(values: list[float], percent: bool = True) -> str:
    s = summarise(values)
    if s["mean"] is None:
        return "–"
    if percent:
        return f"{100 * s['mean']:.0f}% [{100 * s['low']:.0f}, {100 * s['high']:.0f}]"
    return f"{s['mean']:.3g} [{s['low']:.3g}, {s['high']:.3g}]"


def table(results: list[dict], ranks, trained) -> str:
    rows = [("dense (default)", [r["dense"] for r in results], None)]
    rows += [(f"dense truncated to rank {k}", [r["truncated"][str(k)] for r in results], "error") for k in ranks]
    rows += [(f"trained at rank {k}", [r["trained"][str(k)] for r in results], "distance_to_dense") for k in trained]
    cols = ["DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "benign_unchanged", "benign_list_unchanged"]
    head = ["| delta | " + " | ".join(cols) + " | replies as dense | rel. Frobenius distance to dense | update bytes "
            "| revert fixups (elements) | edit s |",
            "|---|" + "---|" * (len(cols) + 5)]
    lines = []
    for label, entries, err in rows:
        dense_replies = [r["dense"]["replies"] for r in results]
        cells = [cell([e["metrics"][c] for e in entries]) for c in cols]
        cells.append(cell([same_as(e["replies"], d) for e, d in zip(entries, dense_replies)]))
        cells.append(cell([e[err] for e in entries], percent=False) if err else "0")
        cells.append(f"{sum(e['bytes'] for e in entries) / len(entries):,.0f}")
        # (results measured while positions were int64: 8 + 4 bytes per fixup of this fp32 model)
        cells.append(f"{sum(e.get('fixups', e['fixup_bytes'] / 12) for e in entries) / len(entries):,.0f}")
        cells.append(f"{sum(e['seconds'] for e in entries) / len(entries):.1f}" if "seconds" in entries[0] else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(head + lines)


def spectrum_table(results: list[dict], ranks) -> str:
    head = ["| rank | " + " | ".join(str(k) for k in ranks) + " |", "|---|" + "---|" * len(ranks)]
    def spread(key, k, scale, unit):
        values = [scale * r[key][str(k)] for r in results]
        return f"{sum(values) / len(values):.{1 if unit else 3}f}{unit} [{min(values):.1f}, {max(values):.1f}]" \
            if unit else f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

    energy = "| energy held (mean [min, max]) | " + " | ".join(spread("energy", k, 100, "%") for k in ranks) + " |"
    error = "| relative Frobenius error of the truncation (mean [min, max]) | " + " | ".join(
        spread("error", k, 1, "") for k in ranks) + " |"
    top = [r["singular_values"] for r in results]
    ratio = sum(s[0] / s[min(63, len(s) - 1)] for s in top) / len(top)
    return "\n".join(head + [energy, error]) + (f"\n\nSingular values fall slowly: the largest is on average "
                                                f"{ratio:.1f}x the 64th.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "../../shared/safeedit/test_dev.json"))
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--evaluated", type=int, default=16,
                        help="evaluate (DS/DG, retention) the first N records; the rest get the spectrum only")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--trained", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--cache", default="/tmp/dinm-bench-lowrank", help="per-record results (a re-run resumes)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    records = dinm.load_instances(args.data)[:args.limit]
    benign = load_benign(os.path.join(HERE, "../data/benign.json"))
    model, tokenizer = dinm.load_model("embedded", dtype="float32")
    gen = dict(max_new_tokens=args.max_new_tokens)
    prompts = [b.prompt for b in benign]
    benign = (prompts, generate(model, tokenizer, prompts, batch_size=len(prompts), **gen))  # unedited, once
    os.makedirs(args.cache, exist_ok=True)
    results = []
    for i, inst in enumerate(records):  # (each result is kept as it comes: a re-run resumes)
        evaluated = i < args.evaluated
        stem = os.path.join(args.cache, f"{i:03d}-{args.max_new_tokens}")
        out = cached(f"{stem}-{int(evaluated)}.json",
                     lambda: run_record(model, tokenizer, inst, benign, gen, args.ranks, evaluated, stem))
        if evaluated:  # (`TRAINED`: the initialisation of the factors in use; results of another are not reused)
            out["trained"] = {str(r): cached(f"{stem}-trained-{TRAINED}-r{r}.json", lambda: run_trained(
                model, tokenizer, inst, benign, gen, r, stem)) for r in args.trained}
        results.append(out)
        print(f"record {i} ({inst.id}, layer {out['layer']}) " + ", ".join(
            f"r{k} DS {v['metrics']['DS']:.0f} {v['seconds']:.0f}s" for k, v in out.get("trained", {}).items()),
            flush=True)
    body = table([r for r in results if "truncated" in r], args.ranks, args.trained)
    spectrum = spectrum_table(results, args.ranks)
    print(spectrum, body, sep="\n\n")
    layers = sorted({r["layer"] for r in results})
    if not args.no_write:
        record("Low-rank edits: truncated and trained", (
            f"Embedded SmolLM2-135M-Instruct (fp32), the first {len(records)} records of "
            f"`{os.path.basename(args.data)}` for the spectrum, the first {min(args.evaluated, len(records))} of them "
            f"evaluated; "
            f"single-instance protocol, the dense edit `EditConfig.dense()` (layers {layers}); "
            f"judge `refusal`, greedy {args.max_new_tokens} new tokens, benign list = the {len(prompts)} prompts of "
            f"`data/benign.json` (generated in one batch; the record's prompts in batches of 8). DS/DG: coherent "
            f"safe replies; `benign_unchanged`: the record's knowledge reply "
            f"identical to the unedited model's; `benign_list_unchanged`: the same over the list; \"replies as "
            f"dense\": every reply of the record (5 safety, 1 knowledge, {len(prompts)} benign) identical to the dense "
            f"edit's. Means over records [95% bootstrap interval]. Trained ranks edit the layer the dense edit "
            f"located; 'edit s' includes locate for the dense edit only.\n\n"
            f"Energy of the dense update held by its top singular values:\n\n{spectrum}\n\n{body}"))


if __name__ == "__main__":
    main()
