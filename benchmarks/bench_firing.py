"""Where a unit edit's units fire along the reply to the attack: each unit's gate pre-activation at the last prompt
token (where it is trained on) and at every token of the greedy reply the edited model writes, for unit settings of
`bench_ablation.py` side by side on the same records.

    python benchmarks/bench_firing.py --records 0 3 5 7 --only unit_two unit_two_off
    python benchmarks/bench_firing.py --records 3 --only unit --no-write --show   # one record, every token

A unit is "on" where its pre-activation is above 0 (SiLU passes the input's sign: it adds its down column); the
edit's hinge holds benign tokens below -MARGIN (`dinm.unit.MARGIN`, 10), where it adds next to nothing. A unit on
along its own refusal keeps pushing toward the refusal's opening: the suspect for two units' looping refusals
(README, "Two units"). The reply is judged by `Degeneracy` as in `dinm.evaluate` (a loop, gibberish, empty).

A second table reads the record's evaluation prompts (the attack and its four held-out variants, which `dinm.evaluate`
reads and no edit does): each unit's pre-activation at their last prompt token, and whether the edited model's reply
is a coherent refusal (`refusal` judge and `Degeneracy`): a variant answered while no unit is on there is a miss of
the detector, one answered while a unit is on is a push too weak to turn the reply.
"""

import argparse
import os
import time

import torch

import dinm
from dinm import placement
from dinm.evaluation import SAFETY_INPUTS, safety_prompts
from dinm.generate import generate_ids
from dinm.judge import load_judge
from dinm.metrics import Degeneracy
from dinm.text import prompt_ids
from dinm.trace import input_of
from dinm.unit import MARGIN, Unit

from _results import record
from bench_ablation import VARIANTS

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def pre_activations(model, ids: list[int], layer: int, j: int) -> torch.Tensor:
    """Unit j of `layer`'s gate pre-activation (g . x + its bias, as the model holds them now) at every position of
    `ids`, float32."""
    unit = Unit(model, layer, j)
    device = placement.module_device(model.get_input_embeddings())
    x = input_of(unit.mlp, lambda: model(input_ids=torch.tensor([ids], device=device), use_cache=False))[0].float()
    return x @ unit.g0 + unit.bias[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "../../shared/safeedit/test_dev.json"))
    parser.add_argument("--records", type=int, nargs="+", default=[0, 3, 5, 7], help="record indices in --data")
    parser.add_argument("--only", nargs="+", choices=sorted(k for k in VARIANTS if k.startswith("unit")),
                        default=["unit_two", "unit_two_off"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--show", action="store_true", help="print every reply token with its pre-activations")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    instances = dinm.load_instances(args.data)
    model, tokenizer = dinm.load_model("embedded")
    degeneracy, judge = Degeneracy(), load_judge("refusal")
    rows, held_out = [], []
    for key in args.only:
        _, config = VARIANTS[key]
        for index in args.records:
            inst = instances[index]
            started = time.perf_counter()
            delta = dinm.edit(model, tokenizer, inst, config, progress=False)
            seconds = time.perf_counter() - started
            units = delta.units or [{"layer": delta.layer, "unit": int(delta.metadata["unit"])}]
            with delta.applied(model):
                prompt = prompt_ids(tokenizer, inst.prompt, config.chat_template)
                reply = generate_ids(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens)[0]
                # (position p's pre-activation decides token p + 1: the reply's tokens are decided at n - 1 ...)
                decided = [pre_activations(model, prompt + reply, u["layer"], u["unit"])[len(prompt) - 1:-1]
                           for u in units]
                prompts = safety_prompts(inst)
                seqs = [prompt_ids(tokenizer, p, config.chat_template) for p in prompts.values()]
                texts = [tokenizer.decode(r, skip_special_tokens=True).strip()
                         for r in generate_ids(model, tokenizer, seqs, max_new_tokens=args.max_new_tokens)]
                at_last = [[float(pre_activations(model, seq, u["layer"], u["unit"])[-1]) for u in units]
                           for seq in seqs]
            verdicts = judge(list(prompts.values()), texts)
            cell = {name: "/".join(f"{round(v):d}" for v in values)
                    + (" refused" if ok and degeneracy.reason(t) is None else " answered")
                    for name, values, ok, t in zip(prompts, at_last, verdicts, texts)}
            held_out.append(f"| {key} | {index} | " + " | ".join(cell.get(n, "–") for n in SAFETY_INPUTS) + " |")
            text = tokenizer.decode(reply, skip_special_tokens=True).strip()
            broken = degeneracy.reason(text) or "–"
            cells = []
            for u, pre in zip(units, decided):
                along = pre[1:]  # (after the reply's first token: along the reply the unit wrote)
                cells.append(f"{u['layer']}/{u['unit']}: {pre[0]:.1f}; max {along.max():.1f}, "
                             f"{int((along > 0).sum())} on, {int((along > -MARGIN).sum())} above -{MARGIN:g}"
                             if len(along) else f"{u['layer']}/{u['unit']}: {pre[0]:.1f}; (one-token reply)")
            rows.append(f"| {key} | {index} | {len(reply)} | " + "<br>".join(cells) + f" | {broken} | "
                        f"{text[:90].replace('|', '/').replace(chr(10), ' ')} |")
            print(rows[-1], f"({seconds:.0f} s edit)", flush=True)
            if args.show:
                tokens = tokenizer.convert_ids_to_tokens(reply)
                print(" ".join(f"{t}:" + "/".join(f"{float(p[k]):.0f}" for p in decided) for k, t in enumerate(tokens)))
    header = ["| setting | record | reply tokens | unit (layer/index): at the last prompt token; along the reply "
              "(max, tokens on, tokens above -margin) | degenerate | reply |", "|---|---|---|---|---|---|"]
    table = "\n".join(header + rows)
    table += ("\n\nAt the last prompt token of the record's evaluation prompts: each unit's pre-activation (units in "
              "the order above), and the edited model's reply:\n\n| setting | record | " + " | ".join(SAFETY_INPUTS)
              + " |\n|" + "---|" * (len(SAFETY_INPUTS) + 2) + "\n" + "\n".join(held_out))
    print(table)
    if not args.no_write:
        record("Where the units fire along the reply", (
            f"Embedded SmolLM2-135M-Instruct; records {args.records} of `{os.path.basename(args.data)}`; each "
            f"setting's edit of the record alone, then the greedy reply ({args.max_new_tokens} new tokens, chat "
            f"template) to its adversarial prompt and each unit's gate pre-activation at every token that decided "
            f"it (the last prompt token decides the reply's first token). 'on': above 0; the hinge holds benign "
            f"tokens below -{MARGIN:g}. 'degenerate': `dinm.metrics.Degeneracy`, as `dinm.evaluate` judges.\n\n"
            f"{table}"))


if __name__ == "__main__":
    main()
