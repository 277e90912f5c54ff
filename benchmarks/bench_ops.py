"""dinm's fused ops against the straightforward PyTorch code, side by side in one process.

    python benchmarks/bench_ops.py

* layer_distances, all three given the per-layer hidden states as a model returns them (a list): (a) the
  per-layer Python loop EasyEdit's locate uses (one small op chain per layer), (b) dinm's vectorised PyTorch
  twin (which stacks the layers first), (c) the fused op (reads the layers in place, one call).
* masked_update: dense `weight += delta` (Tensor.add_) against the fused op; and a row-masked update (10% of
  the rows, compact delta) against the twin's index_select / index_copy.

Shapes: the embedded model (30 layers, hidden 576, 300 tokens, down_proj 576x1536) and a 7B Llama (32 layers,
hidden 4096, 600 tokens, down_proj 4096x11008), float32 on CPU; on a GPU also bfloat16, with achieved memory
bandwidth (bytes read and written once / time) as a fraction of the device's peak when it is known.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dinm import ops, twin as pytorch_twin

from _results import record

SHAPES = {"embedded (SmolLM2-135M)": (30, 300, 576, 1536), "7B Llama": (32, 600, 4096, 11008)}
PEAK_GBS = {"H100": 3350, "H200": 4800, "A100": 2039}  # HBM peak, GB/s (vendor figures)
KINDS = ("cosine", "l2_tokens")


def timed(fn, repeat: int, device: torch.device) -> float:
    """Median wall time of `fn` in ms (after one warm-up), synchronising a GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def easyedit_loop(per_layer, mask_a, mask_b, kind):
    out = []
    for h in per_layer:  # (2, tokens, hidden): one layer, the safe and the unsafe response
        a, b = h[0], h[1]
        if kind == "l2_tokens":
            both = mask_a & mask_b
            out.append(torch.dist(a[both].float(), b[both].float(), p=2))
        else:
            x, y = a[mask_a].float().mean(0), b[mask_b].float().mean(0)
            out.append(1 - F.cosine_similarity(x, y, dim=0))
    return torch.stack(out)


def bench_distances(name, layers, tokens, hidden, dtype, device, repeat):
    per_layer = [torch.randn(2, tokens, hidden, dtype=dtype, device=device) for _ in range(layers)]
    mask = torch.ones(tokens, dtype=torch.bool, device=device)
    mask[0] = False
    mask_a, mask_b = mask.clone(), mask.clone()
    mask_b[int(tokens * 0.8):] = False  # the unsafe response is shorter
    rows = []
    for kind in KINDS:
        loop = timed(lambda: easyedit_loop(per_layer, mask_a, mask_b, kind), repeat, device)
        twin = timed(lambda: pytorch_twin.layer_distances(per_layer, mask_a[None], mask_b[None], kind), repeat, device)
        fused = timed(lambda: ops.layer_distances(per_layer, mask_a[None], mask_b[None], kind), repeat, device)
        read = sum(h.numel() * h.element_size() for h in per_layer)
        gbs = read / (fused * 1e-3) / 1e9
        rows.append(f"| {name} | {kind} | {str(dtype)[6:]} | {loop:.2f} | {twin:.2f} | {fused:.2f} "
                    f"| {loop / fused:.1f}× | {twin / fused:.1f}× | {gbs:.1f}{_peak(gbs, device)} |")
    return rows


def bench_update(name, rows_, cols, dtype, device, repeat):
    weight = torch.randn(rows_, cols, dtype=dtype, device=device)
    delta = torch.randn(rows_, cols, dtype=dtype, device=device) * 1e-3
    mask = torch.zeros(rows_, dtype=torch.bool, device=device)
    mask[::10] = True
    compact = delta[mask].contiguous()
    dense_add = timed(lambda: weight.add_(delta), repeat, device)
    dense_op = timed(lambda: ops.masked_update(weight, delta, None, 1.0), repeat, device)
    masked_twin = timed(lambda: pytorch_twin.masked_update(weight, compact, mask, 1.0), repeat, device)
    masked_op = timed(lambda: ops.masked_update(weight, compact, mask, 1.0), repeat, device)
    moved = 3 * weight.numel() * weight.element_size()  # read weight and delta, write weight
    gbs = moved / (dense_op * 1e-3) / 1e9
    return [f"| {name} | {rows_}×{cols} | {str(dtype)[6:]} | {dense_add:.2f} | {dense_op:.2f} | "
            f"{dense_add / dense_op:.2f}× | {masked_twin:.2f} | {masked_op:.2f} | {masked_twin / masked_op:.1f}× | "
            f"{gbs:.1f}{_peak(gbs, device)} |"]


def _peak(gbs, device):
    if device.type != "cuda":
        return ""
    peak = next((v for k, v in PEAK_GBS.items() if k in torch.cuda.get_device_name()), None)
    return f" ({100 * gbs / peak:.0f}% of {peak} GB/s)" if peak else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    print(f"backend: {ops.backend()}, device: {device}, threads: {torch.get_num_threads()}")
    dist = ["| shape | kind | dtype | EasyEdit loop ms | PyTorch twin ms | fused ms | "
            "loop / fused | twin / fused | fused GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    upd = ["| shape | matrix | dtype | dense `+=` ms | fused ms | `+=` / fused | masked twin ms | masked fused ms "
           "| twin / fused | fused dense GB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        for name, (layers, tokens, hidden, inter) in SHAPES.items():
            for dtype in dtypes:
                dist += bench_distances(name, layers, tokens, hidden, dtype, device, args.repeat)
                upd += bench_update(name, hidden, inter, dtype, device, args.repeat)
                print("\n".join(dist[-len(KINDS):] + upd[-1:]))
    body = (f"Backend `{ops.backend()}`, {torch.get_num_threads()} threads, median of {args.repeat} runs after a "
            f"warm-up. One pair (safe, unsafe); the unsafe response masks its last 20% of tokens.\n\n"
            f"layer_distances (all layers, one call):\n\n" + "\n".join(dist) +
            "\n\nmasked_update (the MLP output projection; masked = 10% of rows, compact delta):\n\n" + "\n".join(upd))
    print(body)
    if not args.no_write:
        record(f"Fused ops ({device.type.upper()})", body)


if __name__ == "__main__":
    main()
