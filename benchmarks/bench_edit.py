"""dinm.edit against a faithful re-implementation of the paper's (EasyEdit) DINM loop, same process, same
records, same CPU, on the embedded model.

    python benchmarks/bench_edit.py --data ../shared/safeedit/test_dev.json --limit 8

(a) the paper's loop, computing what EasyEdit's `execute_dinm` computes (`paper_loop`): raw prompt (no chat
    template), re-tokenised every step, a full fp32 forward + backward of the whole model every step with the NLL
    taken from an fp32 copy of all logits, a second full no-grad forward of the benign text every step for its KL
    term (softmax and log-softmaxes of the fp32 logits), Adam on the layer's weight in place. Locate: the bare
    responses as one padded batch, all hidden states and logits, `torch.dist` per layer in a Python loop.
(b) `dinm.edit` with `EditConfig.v0()` (the first default; the same steps, lr and single KL sequence as the
    paper's loop): tokenised once, the frozen layers below the edited one run once and are replayed, logits only
    where the loss reads them, the LM head fused with the loss (`dinm.losses.Head`), the unedited distribution of
    the KL computed once.
(c) the same with `compute_dtype="bfloat16"`: the passes in bf16 (autocast, bf16 copies of the matrices that run,
    made once), master, loss and update in fp32 — on a CPU with AMX the matrix products are several times faster.
(d) for information, `dinm.edit` with today's default `EditConfig()` (50 steps and more per step: not a ratio).
All of (a)-(c) run 10 steps on the layer dinm locates, so the per-step cost is compared like for like; the
"final NLL" column compares the final safe-response NLL of (b) and (c).
"""

import os
import resource
import statistics
import time

import torch

import dinm
from dinm.arch import mlp_out_name

from _results import arguments, cpu_bf16_native, record


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
    requiring grad (the unedited distribution of the KL, its graph kept alive, as there). Each step: the edit text re-tokenised; a full
    forward; the NLL from an fp32 copy of all the logits, log-softmax over the response positions; a second full
    forward of the benign text without gradient; the KL over the answer positions from softmax and two
    log-softmaxes of the fp32 logits; `kl_factor * nll + kl` backward; Adam on the weight in place."""
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


def main():
    args = arguments(__doc__, limit=8)
    os.environ["DINM_CACHE"] = "off"  # the default config's key statistic: computed here, not read from disk

    torch.manual_seed(0)
    instances = dinm.load_instances(args.data)[: args.limit]
    model, tok = dinm.load_model("embedded")
    config = dinm.EditConfig.v0()  # the setting measured against the paper's loop: the same work per step
    bf16_native = torch.cuda.is_available() or cpu_bf16_native()
    dinm.edit(model, tok, instances[0], config.replace(steps=1), progress=False)  # warm-up
    rows = ["| record | layer | paper locate s | dinm locate s | paper edit s | dinm edit s | speed-up | "
            "dinm bf16 edit s | speed-up | final NLL fp32 / bf16 | default: layer, locate + edit s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    sums = {"ref_loc": [], "loc": [], "ref": [], "dinm": [], "bf16": [], "default": []}
    for inst in instances:
        start = time.perf_counter()
        paper_locate(model, tok, inst)
        ref_loc = time.perf_counter() - start
        start = time.perf_counter()
        delta = dinm.edit(model, tok, inst, config, progress=False)
        total = time.perf_counter() - start
        loc = delta.summary()["seconds"]["locate"]
        low, bf16 = None, float("nan")
        if bf16_native:  # (emulated bf16 products take many times fp32's: not a figure worth the wait)
            start = time.perf_counter()
            low = dinm.edit(model, tok, inst, config.replace(layer=delta.layer, compute_dtype="bfloat16"),
                            progress=False)
            bf16 = time.perf_counter() - start
        start = time.perf_counter()
        paper_loop(model, tok, inst, delta.layer, steps=config.steps, lr=config.lr)
        ref = time.perf_counter() - start
        start = time.perf_counter()
        default = dinm.edit(model, tok, inst, progress=False)  # today's default, not comparable with (a)
        default_s = time.perf_counter() - start
        for key, value in zip(sums, (ref_loc, loc, ref, total - loc, bf16, default_s)):
            sums[key].append(value)
        rows.append(f"| {inst.id} | {delta.layer} | {ref_loc:.2f} | {loc:.2f} | {ref:.2f} | {total - loc:.2f} | "
                    f"{ref / (total - loc):.1f}x | {bf16:.2f} | {ref / bf16:.1f}x | "
                    f"{delta.history[-1].nll:.3f} / {low.history[-1].nll if low else float('nan'):.3f} | "
                    f"{default.layer}, {default_s:.2f} |")
        print(rows[-1], flush=True)
    mean = {k: statistics.mean(v) for k, v in sums.items()}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body = (f"SmolLM2-135M-Instruct (embedded, fp32), {len(instances)} records of `{args.data}`, "
            f"{config.steps} steps, lr {config.lr}, both on the layer dinm locates.\n\n" + "\n".join(rows) +
            f"\n\nmean: paper locate {mean['ref_loc']:.2f} s, dinm locate {mean['loc']:.2f} s; "
            f"paper edit {mean['ref']:.2f} s, dinm edit {mean['dinm']:.2f} s: "
            f"**{mean['ref'] / mean['dinm']:.1f}x**, dinm bf16 edit {mean['bf16']:.2f} s: "
            f"**{mean['ref'] / mean['bf16']:.1f}x** (ratios of means). The bf16 edits ran on the layer given, so "
            f"their time has no locate in it{'' if bf16_native else ' (not run: this CPU has no native bf16, nan)'}. Peak RSS of the process: {peak_mb:.0f} MB.\n\n"
            f"Last column: `dinm.edit` with today's default `EditConfig()` (locate among inner layers, "
            f"{dinm.EditConfig().steps} steps, KL on the model's own reply, generated first, benign-key penalty) — "
            f"more work than (a), so no ratio: mean {mean['default']:.2f} s. Its key statistic is computed the "
            f"first time a layer comes up in the process (`DINM_CACHE=off` here, so no earlier run's file is read).")
    print(body)
    if not args.no_write:
        record("Edit: dinm.edit vs the paper's loop", body)


if __name__ == "__main__":
    main()
