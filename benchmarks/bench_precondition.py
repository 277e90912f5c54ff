"""Where an edit's optimiser ends after its steps, plain Adam against Adam whitened by the keys (`precondition="keys"`),
on a few SafeEdit records: the final safe-response NLL, the benign KL, the benign-key penalty ("moved") and the loss
they make, per setting. No generation, no judge: this is what chose `KL_KEYS_WEIGHT` and the step count before any
evaluation (the 16-record ablation then judged the choice by the README's rule).

    python benchmarks/bench_precondition.py --records 1 3

Each setting runs `dinm.edit` once per record, its layer's key statistic already cached (the default runs first).
`--kl-keys` lists the values of `dinm.editing.KL_KEYS_WEIGHT` tried (0: the corpus's keys alone).
"""

import argparse
import os
import time

import torch

import dinm
import dinm.editing
from dinm import EditConfig

from _results import record

HERE = os.path.dirname(os.path.abspath(__file__))
WHITENED = [dict(steps=10, lr=2e-3), dict(steps=15, lr=1e-3), dict(steps=20, lr=1e-3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "../../shared/safeedit/test_dev.json"))
    parser.add_argument("--records", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--kl-keys", type=float, nargs="+", default=[0.0, 1.0, 10.0, 30.0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    instances = dinm.load_instances(args.data)
    model, tok = dinm.load_model("embedded")
    chosen = dinm.editing.KL_KEYS_WEIGHT
    rows = ["| record | setting | layer | s | NLL | KL | moved | loss |", "|---|---|---|---|---|---|---|---|"]
    settings = [("dense default (plain Adam, 50 steps, lr 2e-3)", EditConfig.dense(), None)] + [
        (f"whitened, KL keys x{weight:g}, {kw['steps']} steps, lr {kw['lr']:g}",
         EditConfig.dense(precondition="keys", **kw), weight) for weight in args.kl_keys for kw in WHITENED]
    try:
        for index in args.records:
            inst = instances[index]
            dinm.edit(model, tok, inst, EditConfig.dense(steps=1), progress=False)  # its statistic and own reply: kept
            for label, config, weight in settings:
                if weight is not None:
                    dinm.editing.KL_KEYS_WEIGHT = weight
                started = time.perf_counter()
                delta = dinm.edit(model, tok, inst, config, progress=False)
                seconds = time.perf_counter() - started
                last = delta.history[-1]
                rows.append(f"| {inst.id} | {label} | {delta.layer} | {seconds:.1f} | {last.nll:.4f} | {last.kl:.2e} | "
                            f"{last.moved:.2e} | {last.loss:.4f} |")
                print(rows[-1], flush=True)
    finally:
        dinm.editing.KL_KEYS_WEIGHT = chosen
    body = (f"Embedded SmolLM2-135M-Instruct (fp32 weights; the passes in the library's `auto` dtype), records "
            f"{', '.join(map(str, args.records))} of `{os.path.basename(args.data)}`, 2 threads, one process. The last "
            f"step's figures: NLL of the safe response, KL on the model's own benign reply, `moved` (the benign-key "
            f"penalty, mean ||D k||^2 / mean ||W k||^2), and the loss NLL + 10 KL + 1000 moved. 's' is locate + edit, "
            f"the layer's key statistic and the model's own benign reply kept from a warm-up edit. "
            f"`KL keys xW`: the KL sequences' key moment enters the whitening W times heavier than the corpus's "
            f"(`dinm.editing.KL_KEYS_WEIGHT`, {chosen:g} in dinm).\n\n" + "\n".join(rows))
    print(body)
    if not args.no_write:
        record("Preconditioned steps: where 10-20 whitened steps end", body)


if __name__ == "__main__":
    main()
