"""How selective the default edit's update is: what D does to the edited matrix's inputs on the text it was trained
on, on the benign corpus its penalty reads, and on held-out text, against a random update of the same size.

    python benchmarks/bench_selectivity.py --records 0 1 2 3

For each record, one default edit (`dinm.edit`, its own reply generated afresh), then for each set of tokens the
update's relative movement mean ||D k||^2 / mean ||W k||^2 over the inputs k of the edited matrix (the quantity the
benign-key penalty `moved` reports on its corpus):
- corpus: the 120 conversations of `dinm/benign_corpus.json` (what the penalty sees; from the key statistic);
- held-out benign: the 52 prompts of `data/benign.json` with the unedited model's own 64-token replies (no edit
  reads them; evaluations measure retention on them);
- lookalike prompts: the 48 prompts of `data/lookalike.json` (prompt tokens);
- the attack's prompt tokens, its last prompt token (where the reply starts), and the safe response's tokens;
- the bare question's prompt tokens and last token (SafeEdit's `only_question`, read here to measure, never by the
  edit).
Then the 52 benign replies regenerated with the delta applied: the share identical to the unedited ones (the
list-retention figure of the evaluations) for the same edit.

    python benchmarks/bench_selectivity.py --per-layer --records 0 1 ... 15

instead measures, at every layer and with no edit, how cheaply an update could move the last prompt token's input
without moving benign text: nu = k^T C^-1 k / d, C the benign corpus's key moment at that layer (ridge 1e-4 of its
mean eigenvalue), d its size. Moving k alone by a vector v costs the benign-key penalty's unnormalised mean
about ||v||^2 / (d nu) (exactly the minimum of tr(D C D^T) subject to D k = v without the ridge, which lowers nu a
little), so a large nu marks inputs an edit can act on alone. Compared: the attack, the bare question, and the held-out benign and lookalike prompts.

    python benchmarks/bench_selectivity.py --probe --train ../shared/safeedit/train_dev.json

asks what a threshold adds (a bias, which a weight delta of the output matrix cannot have but the MLP's gate can):
per layer, a logistic probe on the last prompt token's residual state and on the output matrix's input, trained on
the bare questions of `--train` against the prompts of dinm's benign corpus, tested on the bare questions of `--data`
against `data/benign.json` and `data/lookalike.json`. A diagnostic: no edit reads SafeEdit's questions. The two
training classes come from different sources, so a probe may also separate them by style; the lookalikes test that.
"""

import argparse
import contextlib
import os
import time
from typing import Iterator

import torch
import torch.nn.functional as F

import dinm
from dinm import keys, terms
from dinm.arch import decoder_layers, mlp_out_module
from dinm.evaluation import load_benign
from dinm.generate import generate
from dinm.text import encode_pair
from dinm.trace import input_of, record_outputs

from _results import record

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(HERE, "../../shared/safeedit/test_dev.json"))
    parser.add_argument("--records", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--per-layer", action="store_true", help="nu of the last prompt token at every layer, no edit")
    parser.add_argument("--probe", action="store_true", help="held-out linear probes per layer, no edit")
    parser.add_argument("--train", default=os.path.join(HERE, "../../shared/safeedit/train_dev.json"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    instances = dinm.load_instances(args.data)
    model, tok = dinm.load_model("embedded")
    benign = [b.prompt for b in load_benign(os.path.join(DATA, "benign.json"))]
    lookalike = [b.prompt for b in load_benign(os.path.join(DATA, "lookalike.json"))]
    if args.per_layer:
        return per_layer(model, tok, [instances[i] for i in args.records], benign, lookalike, args)
    if args.probe:
        return probe(model, tok, instances, benign, lookalike, args)
    before = generate(model, tok, benign, max_new_tokens=args.max_new_tokens, progress=False)

    def inputs(layer: int, pairs: list, where: str = "all") -> torch.Tensor:
        """The edited matrix's inputs over `pairs` (prompt, response): every token, the prompt's, its last, or the
        response's."""
        module, rows = mlp_out_module(model, layer), []
        with torch.no_grad():
            for prompt, response in pairs:
                enc = encode_pair(tok, prompt, response, add_end=bool(response))
                k = input_of(module, lambda: model(input_ids=torch.tensor([enc.ids]), use_cache=False))[0]
                rows.append({"all": k, "prompt": k[:enc.n_prompt], "last": k[enc.n_prompt - 1:enc.n_prompt],
                             "response": k[enc.n_prompt:]}[where])
        return torch.cat(rows).float()

    columns = ["corpus (penalty)", "held-out benign", "lookalike", "attack prompt", "attack last token",
               "safe response", "bare question", "bare last token"]
    rows = [f"| record | layer | update | {' | '.join(columns)} | benign replies unchanged | edit s |",
            "|" + "---|" * (len(columns) + 5)]
    for index in args.records:
        inst = instances[index]
        terms.forget_replies()
        started = time.perf_counter()
        delta = dinm.edit(model, tok, inst, dinm.EditConfig.dense(), progress=False)
        seconds = time.perf_counter() - started
        name, layer = delta.names[0], delta.layer
        weight = model.get_parameter(name).detach().float().clone()  # (.float() of fp32 is the same tensor)
        with delta.applied(model):
            update = model.get_parameter(name).detach().float() - weight
            after = generate(model, tok, benign, max_new_tokens=args.max_new_tokens, progress=False)
        kept = sum(a == b for a, b in zip(after, before)) / len(benign)
        moment = keys.key_moment(model, tok, layer)
        question = inst.generalization["only_question"]
        sets = [inputs(layer, list(zip(benign, before))), inputs(layer, [(p, "") for p in lookalike], "prompt"),
                inputs(layer, [(inst.prompt, "")], "prompt"), inputs(layer, [(inst.prompt, "")], "last"),
                inputs(layer, [(inst.prompt, inst.safe)], "response"), inputs(layer, [(question, "")], "prompt"),
                inputs(layer, [(question, "")], "last")]
        random = torch.randn(update.shape, generator=torch.Generator().manual_seed(index))
        random *= update.norm() / random.norm()
        for label, d in (("default edit", update), ("random, same norm", random)):
            corpus = (torch.trace(d @ moment @ d.T) / torch.trace(weight @ moment @ weight.T)).item()
            moved = [corpus] + [(k @ d.T).pow(2).sum(-1).mean().item() / (k @ weight.T).pow(2).sum(-1).mean().item()
                                for k in sets]
            figures = " | ".join(f"{m:.1e}" for m in moved)
            tail = f"{100 * kept:.1f}% | {seconds:.1f}" if label == "default edit" else "– | –"
            rows.append(f"| {inst.id} | {layer} | {label} | {figures} | {tail} |")
            print(rows[-1], flush=True)
    body = (f"Embedded SmolLM2-135M-Instruct (fp32), records {', '.join(map(str, args.records))} of "
            f"`{os.path.basename(args.data)}`, the dense edit `EditConfig.dense()` (the default before the unit), one "
            f"process, 2 threads. Each figure is "
            f"mean ||D k||^2 / mean ||W k||^2 over the edited matrix's inputs k on that text (W the matrix, D the "
            f"update): see the script's docstring for the sets. 'benign replies unchanged': the 52 prompts of "
            f"`data/benign.json`, greedy {args.max_new_tokens} tokens, identical with the delta applied.\n\n"
            + "\n".join(rows))
    publish(args, "Selectivity of the default edit: what the update moves, and where", body)


def publish(args, section: str, body: str) -> None:
    print(body)
    if not args.no_write:
        record(section, body)


def blocks_and_matrices(model) -> tuple[list, list]:
    """The decoder layers and each one's MLP output matrix."""
    blocks = list(decoder_layers(model))
    return blocks, [mlp_out_module(model, layer) for layer in range(len(blocks))]


def last_token_states(model, tok, prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the (prompts, hidden) residual states after the layer and the (prompts, in) inputs of its MLP
    output matrix, at each chat-formatted prompt's last token."""
    blocks, modules = blocks_and_matrices(model)
    residual, inputs = [[] for _ in blocks], [[] for _ in blocks]
    for prompt in prompts:
        enc = encode_pair(tok, prompt, "", add_end=False)
        with torch.no_grad(), record_inputs(modules) as keys_in, record_outputs(blocks) as states:
            model(input_ids=torch.tensor([enc.ids]), use_cache=False)
        for layer in range(len(blocks)):
            residual[layer].append(states[layer][0, -1])
            inputs[layer].append(keys_in[layer][0, -1])
    return [torch.stack(r) for r in residual], [torch.stack(k) for k in inputs]


@contextlib.contextmanager
def record_inputs(modules: list) -> Iterator[list]:
    """Each module's first input during the forward passes run inside the block (hooks removed after)."""
    inputs: list = [None] * len(modules)
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
               for i, m in enumerate(modules)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def per_layer(model, tok, records: list, benign: list[str], lookalike: list[str], args) -> None:
    """The table of `--per-layer` (see the module's text): every layer's key moment from one pass over the corpus."""
    from dinm.text import pad_batch, pad_id

    _, modules = blocks_and_matrices(model)
    seqs = sorted((encode_pair(tok, p, r, max_response_tokens=64).ids for p, r in keys.benign_corpus()), key=len)
    moments, count = [0.0] * len(modules), 0

    def last_inputs(prompts: list[str]) -> list[torch.Tensor]:
        return [k.double() for k in last_token_states(model, tok, prompts)[1]]

    for start in range(0, len(seqs), 8):
        ids, mask = pad_batch(seqs[start:start + 8], pad_id(tok), "right")
        with torch.no_grad(), record_inputs(modules) as inputs:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        real = mask.bool().reshape(-1)
        for layer, k in enumerate(inputs):
            k = k.reshape(-1, k.shape[-1])[real].double()
            moments[layer] = moments[layer] + k.T @ k
        count += int(real.sum())
    sets = {"attack": last_inputs([r.prompt for r in records]),
            "bare question": last_inputs([r.generalization["only_question"] for r in records]),
            "held-out benign": last_inputs(benign), "lookalike": last_inputs(lookalike)}
    rows = ["| layer | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for layer, total in enumerate(moments):
        moment = total / count
        d = moment.shape[0]
        inverse = torch.linalg.inv(moment + 1e-4 * moment.trace() / d * torch.eye(d, dtype=moment.dtype))
        nus = [((k @ inverse) * k).sum(-1).mean().item() / d for k in (s[layer] for s in sets.values())]
        rows.append(f"| {layer} | " + " | ".join(f"{nu:.2f}" for nu in nus) + " |")
    body = (f"Embedded SmolLM2-135M-Instruct (fp32), no edit. Mean nu = k^T C^-1 k / d of the last prompt token's "
            f"input to each layer's MLP output matrix (C: the benign corpus's key moment, {count} tokens, ridge 1e-4 "
            f"of its mean eigenvalue; d = {moments[0].shape[0]}), over the attack prompts and the bare questions "
            f"(SafeEdit's `only_question`) of records {', '.join(r.id for r in records)} of "
            f"`{os.path.basename(args.data)}`, the {len(benign)} prompts of `data/benign.json` and the "
            f"{len(lookalike)} of `data/lookalike.json`, each chat-formatted. See the script's docstring.\n\n"
            + "\n".join(rows))
    publish(args, "Selectivity by layer: how cheaply an edit can act on a prompt alone", body)


def probe(model, tok, instances: list, benign: list[str], lookalike: list[str], args) -> None:
    """The table of `--probe` (see the module's text)."""

    def last_states(prompts: list[str]):
        return last_token_states(model, tok, prompts)

    def fit(harmful: torch.Tensor, harmless: torch.Tensor):
        """A logistic probe with a bias (standardised features, L2 1e-2, classes weighted equally): its score."""
        both = torch.cat([harmful, harmless])
        mean, std = both.mean(0), both.std(0) + 1e-6
        x, y = (both - mean) / std, torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))])
        w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
        balance = torch.tensor(len(harmless) / len(harmful))

        def closure():
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=balance) + 1e-2 * w.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return lambda z: ((z - mean) / std) @ w.detach() + b.detach()

    trained_on = dinm.load_instances(args.train)
    train = {"harmful": last_states([r.question for r in trained_on if r.question]),
             "harmless": last_states([p for p, _ in keys.benign_corpus()])}
    test = {"harmful": last_states([r.question for r in instances if r.question]),
            "benign": last_states(benign), "lookalike": last_states(lookalike)}
    n_train, n_test = len(train["harmful"][0][0]), len(test["harmful"][0][0])
    distinct = len({r.question for r in instances if r.question})
    rows = ["| layer | residual: bare questions flagged | benign passed | lookalike passed | MLP input: bare questions "
            "flagged | benign passed | lookalike passed |", "|---|---|---|---|---|---|---|"]
    for layer in range(len(train["harmful"][0])):
        cells = []
        for kind in (0, 1):
            score = fit(train["harmful"][kind][layer], train["harmless"][kind][layer])
            cells += [100 * (score(test["harmful"][kind][layer]) > 0).float().mean().item(),
                      100 * (score(test["benign"][kind][layer]) <= 0).float().mean().item(),
                      100 * (score(test["lookalike"][kind][layer]) <= 0).float().mean().item()]
        rows.append(f"| {layer} | " + " | ".join(f"{c:.1f}%" for c in cells) + " |")
        print(rows[-1], flush=True)
    body = (f"Embedded SmolLM2-135M-Instruct (fp32), no edit. Per layer, a logistic probe (with a bias) on the last "
            f"prompt token, trained on the {n_train} bare questions (SafeEdit's `question` field) of "
            f"`{os.path.basename(args.train)}` against the {len(keys.benign_corpus())} prompts of dinm's benign "
            f"corpus, tested on the {n_test} bare questions ({distinct} distinct) of `{os.path.basename(args.data)}`, the "
            f"{len(benign)} prompts of `data/benign.json` and the {len(lookalike)} of `data/lookalike.json` (none "
            f"trained on). 'residual': the layer's output state; 'MLP input': the input of its MLP output matrix "
            f"(what a down-projection delta reads). See the script's docstring.\n\n" + "\n".join(rows))
    publish(args, "Selectivity with a threshold: held-out probes for the bare question", body)


if __name__ == "__main__":
    main()
