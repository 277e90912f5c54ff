"""dinm.edit against the paper's code, side by side: same process, same records, same CPU, fp32 model, on the
embedded model. Every figure is locate + edit, per record.

    python benchmarks/bench_edit.py --limit 7 --reference-repo /path/to/EasyEdit
    python benchmarks/bench_edit.py --limit 7           # no checkout: a re-implementation stands in for it

(ref) With `--reference-repo PATH` (a checkout of https://github.com/zjunlp/EasyEdit; nothing of it is committed or
    downloaded): EasyEdit's own `_locate_toxic_layer` and `execute_dinm`, unchanged, as `SafetyEditor.edit` times
    them (`benchmarks/_reference.py`). Without it: `paper_locate` + `paper_loop` below, which compute what those
    compute (re-tokenised every step, whole-model forward and backward, the KL text's second forward).
(v0) `dinm.edit` with `EditConfig.v0()`: the paper's amount of work (10 steps, lr 5e-4, one KL sequence, the
    instance's benign answer), dinm's locate and passes.
(default) `dinm.edit` with `EditConfig()`, today's default, its benign-key statistic already computed by an
    earlier edit at that layer ("warm": every edit after a machine's first at a layer).
(cold) the first edit on a fresh machine: the default on the demo's instance (`data/example.json`, what `dinm demo`
    edits) with an empty statistic cache, in a fresh process state (no statistic in memory either).
The default's compute dtype is the library's choice for this device (`compute_dtype="auto"`: bf16 passes with an
fp32 master where the CPU multiplies bf16 natively, fp32 elsewhere); v0 computes in the model's dtype (fp32), and
the "v0 auto" column is v0 with the default's choice.
`--profile` adds where one default edit's time goes (the phases the delta records, and torch's operator profile).

Last line: `default_vs_reference: N.Nx  v0_vs_reference: N.Nx` (ratios of the mean seconds per edit).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time

import torch

import dinm
from dinm import keys, terms
from dinm.arch import mlp_out_name
from dinm.text import encode_pair

from _results import layers_label, record

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def paper_locate(model, tok, inst):
    """EasyEdit's locate: the bare responses as one padded batch, full forward with every hidden state (and
    logits), then `torch.dist` layer by layer in a Python loop."""
    batch = tok([inst.safe, inst.unsafe], return_tensors="pt", padding=True)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    distances = [torch.dist(h[0], h[1], p=2).item() for h in hidden[1:]]
    return max(range(len(distances)), key=distances.__getitem__)


def paper_loop(model, tok, inst, layer, steps=10, lr=5e-4, kl_factor=0.1):
    """EasyEdit-style DINM edit, computing what `execute_dinm` computes; returns the trained weight (the model is
    restored afterwards). Before the loop, one full forward of the benign prompt + answer with the edited weight
    requiring grad (the unedited distribution of the KL, its graph kept alive, as there). Each step: the edit text
    re-tokenised; a full forward; the NLL from an fp32 copy of all the logits, log-softmax over the response
    positions; a second full forward of the benign text without gradient; the KL over the answer positions from
    softmax and two log-softmaxes of the fp32 logits; `kl_factor * nll + kl` backward; Adam on the weight in place."""
    weight = model.get_parameter(mlp_out_name(model, layer))
    original = weight.detach().clone()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    weight.requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=lr)
    benign = tok([inst.benign_prompt + " " + inst.benign_answer], return_tensors="pt", padding=True)
    answer_mask = tok([inst.benign_answer], return_tensors="pt", padding=True)["attention_mask"]
    n_answer = answer_mask.shape[1]
    target = tok(" " + inst.safe, return_tensors="pt")["input_ids"]
    base = model(**benign).logits[:, -n_answer:]  # (with a graph: the weight requires grad here)
    try:
        for _ in range(steps):
            # re-tokenised every step; the target carries a leading space and is joined with another, as there
            full = tok([inst.prompt + " " + " " + inst.safe], return_tensors="pt", padding=True)
            optimizer.zero_grad()
            logits = model(**full).logits
            pred = logits.float().clone()[:, :-1][:, -target.shape[1]:]
            nll = -pred.log_softmax(-1).gather(-1, target[..., None]).mean()
            with torch.no_grad():
                post = model(**benign).logits[:, -n_answer:]
            pre = base.detach().float().contiguous().view(-1, base.shape[-1])
            post = post.float().contiguous().view(-1, base.shape[-1])
            kl_rows = (pre.softmax(-1) * (pre.log_softmax(-1) - post.log_softmax(-1))).sum(-1)
            mask = answer_mask.view(-1).float()
            kl = (kl_rows * mask).sum() / mask.sum()  # no gradient: `post` came from a no-grad forward
            loss = kl_factor * nll + kl
            loss.backward()
            optimizer.step()
        return weight.detach().clone()
    finally:
        with torch.no_grad():
            weight.copy_(original)
        weight.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)


class Reimplementation:
    """The stand-in for EasyEdit when no checkout is given: `paper_locate` + `paper_loop`."""

    def edit(self, model, tok, inst):
        layer = paper_locate(model, tok, inst)
        return layer, paper_loop(model, tok, inst, layer)


def timed(call):
    """(result, seconds) of `call()`, timed as the first edit of its instance: no own reply kept from before."""
    terms.forget_replies()
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def cold_edit(model, tok, instance):
    """The default edit with no key statistic anywhere (memory or disk): a fresh machine's first edit. The statistic
    it computes stays in memory for the next edit (as in `dinm`'s own process), its file is removed."""
    folder = tempfile.mkdtemp(prefix="dinm-bench-cold-")
    saved, os.environ["DINM_CACHE"] = os.environ.get("DINM_CACHE"), folder
    keys._CACHE.clear()
    try:
        return timed(lambda: dinm.edit(model, tok, instance, progress=False))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if saved is None:
            del os.environ["DINM_CACHE"]
        else:
            os.environ["DINM_CACHE"] = saved


def phases(delta) -> str:
    s = delta.summary()["seconds"]
    other = s["edit"] - sum(s.get(k, 0.0) for k in ("reply", "keys", "forward", "backward"))
    return (f"locate {s['locate']:.2f}, own reply {s.get('reply', 0):.2f}, key statistic {s.get('keys', 0):.2f}, "
            f"steps: forward {s.get('forward', 0):.2f} + backward and Adam {s.get('backward', 0):.2f}, "
            f"other {other:.2f}")


# the regions dinm labels for the profiler (`torch.profiler.record_function`), in the order an edit runs them
REGIONS = (("dinm::locate", "locate"), ("dinm::own_reply", "the model's own benign reply (64 greedy tokens)"),
           ("dinm::key_statistic", "benign-key statistic (cached here)"),
           ("dinm::nll_pass", "forward of the attack + safe response, NLL"),
           ("dinm::kl_pass", "forward of the benign reply, KL"),
           ("dinm::head", "  of which the fused LM head + loss (both passes)"),
           ("dinm::key_penalty", "benign-key penalty"), ("dinm::backward", "backward (all terms)"),
           ("dinm::adam", "Adam"))


def operator_profile(model, tok, inst) -> str:
    """torch's profile of one default edit: dinm's labelled regions, then the operators taking the most time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        delta = dinm.edit(model, tok, inst, progress=False)
    events = {e.key: e for e in prof.key_averages()}
    lines = ["| region | calls | s |", "|---|---|---|"]
    for key, label in REGIONS:
        if key in events:
            lines.append(f"| {label} | {events[key].count} | {events[key].cpu_time_total / 1e6:.2f} |")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
    return (f"phases the delta records (s): {phases(delta)}\n\n" + "\n".join(lines) +
            f"\n\nOperators (self time):\n\n```\n{table.strip()}\n```")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "../../shared/safeedit/test_dev.json"))
    parser.add_argument("--limit", type=int, default=7)
    parser.add_argument("--reference-repo", metavar="PATH", help="a checkout of EasyEdit: run its own DINM code")
    parser.add_argument("--profile", action="store_true", help="also profile one default edit")
    parser.add_argument("--extra", metavar="JSON", help="one more setting timed beside the others: EditConfig fields "
                        "as a JSON object (e.g. the previous default)")
    parser.add_argument("--extra-label", default="extra", help="its name in the table")
    parser.add_argument("--section", default="Edit: dinm.edit vs the paper's code, side by side",
                        help="RESULTS.md section to (re)write (one per kind of machine)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    extra = dinm.EditConfig.from_dict(json.loads(args.extra)) if args.extra else None
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.reference_repo:
        from _reference import Reference

        reference, ref_name = Reference(args.reference_repo), f"EasyEdit (`{os.path.basename(os.path.abspath(args.reference_repo))}`, its own code)"
    else:
        reference, ref_name = Reimplementation(), "the re-implementation of EasyEdit's loop (no --reference-repo)"
    instances = dinm.load_instances(args.data)[: args.limit]
    model, tok = dinm.load_model("embedded")
    demo = dinm.load_instance(os.path.join(HERE, "../data/example.json"))

    cold, cold_s = cold_edit(model, tok, demo)  # first: nothing cached in this process yet
    print(f"first edit on a fresh machine (the demo's instance, layer {layers_label(cold.layers)}): {cold_s:.2f} s; "
          f"{phases(cold)}",
          flush=True)
    warm_demo, warm_demo_s = timed(lambda: dinm.edit(model, tok, demo, progress=False))
    reference.edit(model, tok, instances[0])  # warm-up of both code paths (allocator, oneDNN kernels)
    dinm.edit(model, tok, instances[0], dinm.EditConfig.v0(steps=1), progress=False)

    rows = ["| record | tokens (prompt + safe) | reference: layer, s | v0: layer, s | v0 auto s | default: layer, s "
            "| default phases (s) | v0 / default speed-up |" + (f" {args.extra_label}: layer, s |" if extra else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" if extra else "")]
    times = {"ref": [], "v0": [], "v0_auto": [], "default": [], **({"extra": []} if extra else {})}
    for inst in instances:
        tokens = len(encode_pair(tok, inst.prompt, inst.safe).ids)
        (ref_layer, _), ref_s = timed(lambda: reference.edit(model, tok, inst))
        v0, v0_s = timed(lambda: dinm.edit(model, tok, inst, dinm.EditConfig.v0(), progress=False))
        _, v0_auto_s = timed(lambda: dinm.edit(model, tok, inst, dinm.EditConfig.v0(compute_dtype="auto"),
                                               progress=False))
        dinm.edit(model, tok, inst, dinm.EditConfig(steps=1), progress=False)  # its layer's statistic: cached
        default, default_s = timed(lambda: dinm.edit(model, tok, inst, progress=False))
        other, other_s = timed(lambda: dinm.edit(model, tok, inst, extra, progress=False)) if extra else (None, 0.0)
        for key, value in zip(times, (ref_s, v0_s, v0_auto_s, default_s, other_s)):
            times[key].append(value)
        rows.append(f"| {inst.id} | {tokens} | {ref_layer}, {ref_s:.2f} | {layers_label(v0.layers)}, {v0_s:.2f} | "
                    f"{v0_auto_s:.2f} | "
                    f"{layers_label(default.layers)}, {default_s:.2f} | {phases(default)} | {ref_s / v0_s:.1f}x / "
                    f"{ref_s / default_s:.1f}x |"
                    + (f" {layers_label(other.layers)}, {other_s:.2f} |" if extra else ""))
        print(rows[-1], flush=True)
    mean = {k: statistics.mean(v) for k, v in times.items()}
    ratio = {k: mean["ref"] / mean[k] for k in times if k != "ref"}
    spread = {k: (min(r / t for r, t in zip(times["ref"], times[k])), max(r / t for r, t in zip(times["ref"], times[k])))
              for k in ("v0", "default")}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body = (f"SmolLM2-135M-Instruct (embedded, loaded in fp32), {len(instances)} records of "
            f"`{os.path.basename(args.data)}`, 2 threads, one process, nothing else running. Reference: {ref_name}. "
            f"Each figure is locate + edit of one record. The default's compute dtype here: `{cold.summary()['compute']}`.\n\n"
            + "\n".join(rows) +
            f"\n\nMeans: reference {mean['ref']:.2f} s, v0 {mean['v0']:.2f} s (**{ratio['v0']:.1f}x**, per record "
            f"{spread['v0'][0]:.1f}-{spread['v0'][1]:.1f}x), v0 with the default's compute dtype {mean['v0_auto']:.2f} s "
            f"({ratio['v0_auto']:.1f}x), default (key statistic cached) {mean['default']:.2f} s "
            f"(**{ratio['default']:.2f}x**, per record {spread['default'][0]:.2f}-{spread['default'][1]:.2f}x; below 1 "
            f"is slower than the reference)"
            + (f", {args.extra_label} (`{args.extra}`) {mean['extra']:.2f} s (**{ratio['extra']:.2f}x**)"
               if extra else "")
            + ". Ratios are of the means.\n\n"
            f"First edit on a fresh machine (`data/example.json`, the demo's instance, no key statistic cached): "
            f"{cold_s:.2f} s at layer {layers_label(cold.layers)} ({phases(cold)}); the same edit once the statistic "
            f"is cached: "
            f"{warm_demo_s:.2f} s ({phases(warm_demo)}). `dinm demo` prints the first figure on a fresh machine "
            f"and the second after. Peak RSS of the process: {peak_mb:.0f} MB.")
    if args.profile:
        body += "\n\nProfile of one default edit (record " + instances[0].id + "):\n\n" + operator_profile(
            model, tok, instances[0])
    print(body)
    if not args.no_write:
        record(args.section, body)
    if extra:
        print(f"{args.extra_label}_vs_reference: {ratio['extra']:.2f}x")
    print(f"default_vs_reference: {ratio['default']:.1f}x  v0_vs_reference: {ratio['v0']:.1f}x")


if __name__ == "__main__":
    main()
