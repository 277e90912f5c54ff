"""The LM head's cost in an edit step against what this CPU's matrix products can do: the sgemm ceiling, the fused
head's forward + backward (`dinm.losses.Head`, NLL), and two other layouts of its first product.

    python benchmarks/bench_head.py

SmolLM2-135M's head (49152 x 576, fp32, random values of its scale) over n response positions, 2 threads, the best
of 3 rounds of 10 calls after two warm-up calls. 'h W^T' is the product `Head` runs; 'W h^T' computes the logits
transposed (vocabulary-major), then needs its log-softmax over the strided dimension; 'chunked' runs h W^T over
vocabulary blocks of 2048 rows into one output; 'grad h' is the backward's product (q - y) W (the head is frozen:
no gradient for W). 'transposed pipeline' is the whole NLL head (both products, log-softmax, gradient) in the
vocabulary-major layout, without autograd: the fused head's figure includes autograd's overhead, which it does not.
Every output buffer is made once, as `Head` keeps its own.
"""

import argparse
import time

import torch

from dinm.losses import LOG_FLOOR, Head

from _results import record

VOCAB, HIDDEN = 49152, 576


def best_ms(fn, rounds: int = 3, calls: int = 10) -> float:
    fn(), fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls * 1e3)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[64, 100, 200])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ceiling = 2 * 2048 ** 3 / best_ms(lambda: a @ b) / 1e6
    weight = torch.randn(VOCAB, HIDDEN) * 0.02
    head = Head(weight)
    rows = ["| positions | h W^T ms (GFLOP/s) | W h^T ms | chunked h W^T ms | log-softmax ms | grad h ms | "
            "fused head forward + backward ms | transposed pipeline ms |", "|---|---|---|---|---|---|---|---|"]
    for n in args.positions:
        hidden = torch.randn(n, HIDDEN)
        target = torch.randint(0, VOCAB, (n,))
        logits, logits_t, log_q_t = torch.empty(n, VOCAB), torch.empty(VOCAB, n), torch.empty(VOCAB, n)
        log_q, grad_h = torch.empty(n, VOCAB), torch.empty(n, HIDDEN)

        def chunked():
            for start in range(0, VOCAB, 2048):
                torch.mm(hidden, weight[start:start + 2048].t(), out=logits[:, start:start + 2048])

        def transposed():  # the whole NLL head in the vocabulary-major layout
            torch.mm(weight, hidden.t().contiguous(), out=logits_t)
            torch.log_softmax(logits_t, 0, out=log_q_t)
            loss = -log_q_t.gather(0, target[None, :]).sum()
            grad = log_q_t.clamp_min_(LOG_FLOOR).exp_()
            grad[target, torch.arange(n)] -= 1
            return loss, torch.mm(grad.t(), weight)

        leaf = hidden.clone().requires_grad_(True)
        product = best_ms(lambda: torch.mm(hidden, weight.t(), out=logits))
        figures = [product, best_ms(lambda: torch.mm(weight, hidden.t(), out=logits_t)), best_ms(chunked),
                   best_ms(lambda: torch.log_softmax(logits, -1, out=log_q)),
                   best_ms(lambda: torch.mm(logits, weight, out=grad_h)), best_ms(lambda: head.loss(leaf, target).backward()),
                   best_ms(transposed)]
        rate = 2 * n * HIDDEN * VOCAB / product / 1e6
        rows.append(f"| {n} | {figures[0]:.1f} ({rate:.0f}) | " + " | ".join(f"{f:.1f}" for f in figures[1:]) + " |")
        print(rows[-1], flush=True)
    body = (f"{__doc__.split(chr(10) + chr(10), 2)[2].strip()}\n\nsgemm 2048 x 2048 x 2048: {ceiling:.0f} GFLOP/s.\n\n"
            + "\n".join(rows))
    print(body)
    if not args.no_write:
        record("LM head: its products against the CPU's sgemm ceiling", body)


if __name__ == "__main__":
    main()
