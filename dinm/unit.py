"""`EditConfig(matrix="unit")`: one unit of a gated MLP repurposed as a thresholded detector of the harmful request,
after Transformer-Patcher (Huang et al., 2023, "one mistake worth one neuron").

A Llama-style MLP is ``down(act(gate x) * up x)``: unit j adds ``act(g_j . x) (u_j . x) v_j`` to the layer's output,
with g_j, u_j rows of the gate and up matrices and v_j a column of the output matrix. The edit takes the unit that
does least on the benign corpus and gives it a new gate row, up row and down column. Where its gate's pre-activation
is far below zero the unit adds almost nothing (act(-10) (u . x) is about 5e-4 (u . x) for SiLU), so unlike an update
of the output matrix, which moves every input by D k, the edit can act on the harmful request and leave other text
alone. Measured on this project's model (README, "What limits the bare question"): a thresholded probe separates
harmful requests from everyday ones at the MLP inputs where no linear map does.

The steps:
1. negatives: the MLP inputs at every token of the benign corpus (`dinm.keys.mlp_inputs`, all of it), of dinm's
   written lookalike prompts (`lookalike_corpus.json`: safe requests that share words with harmful ones, none in
   `data/lookalike.json`, which evaluations read) and of each instance's benign prompt;
2. the unit: least mean |output| over the corpus's tokens (`choose`); what it did there is lost, and counted in the
   penalty;
3. its gate row starts as a probe (`fit_gate`): pre-activation above `MARGIN` at the last prompt token of each trained
   prompt (where the model decides how to reply) and below -`MARGIN` at every negative; its up row starts equal to it
   and its down column at zero, so the first pass is the unedited model but for the repurposed unit's old output;
4. then the three train on the edit's losses plus `UnitHinge`, which keeps the negatives below -`MARGIN` (with
   `EditConfig.unit_reply_off`, the trained responses' own tokens too: `reply_inputs`).

The update is carried as the three vectors' changes, stacked (3, hidden): zero is the unedited unit.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from . import placement
from .arch import arch_spec, matrix_name, mlp_module
from .delta import Delta
from .errors import ArchitectureError, EditError
from .keys import _inputs, mlp_inputs
from .text import Encoded, prompt_ids
from .trace import adding_term, input_of

LOOKALIKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lookalike_corpus.json")
# The gate's pre-activation: above it where the unit acts, below minus it where it must not (SiLU(-10) = -4.5e-4).
MARGIN = 10.0
PROBE_STEPS, PROBE_LR = 300, 0.05  # the gate probe's fit (Adam), before the edit's steps
HINGE_WEIGHT = 1.0  # `UnitHinge`'s weight beside the NLL (its value is in squared pre-activation units)


@lru_cache(maxsize=1)
def lookalike_corpus() -> tuple[str, ...]:
    """The written lookalike prompts the unit must stay off on (`lookalike_corpus.json`)."""
    with open(LOOKALIKES, encoding="utf-8") as f:
        return tuple(json.load(f))


class Unit:
    """Where the repurposed unit lives and what it was: the MLP block, its activation, unit index `j`, the stored
    gate row, up row, down column (float32) and the gate's and up's biases at j (0 when none)."""

    def __init__(self, model, layer: int, j: int):
        check(model, layer)
        self.mlp = mlp_module(model, layer)
        self.act = self.mlp.act_fn
        self.names = {m: matrix_name(model, layer, m) for m in ("gate", "up", "down")}
        self.weights = {m: placement.stored(model, n) for m, n in self.names.items()}
        self.j = j
        device = placement.module_device(self.mlp)
        self.g0 = self.weights["gate"][j].detach().float().to(device)
        self.u0 = self.weights["up"][j].detach().float().to(device)
        self.v0 = self.weights["down"][:, j].detach().float().to(device)
        self.bias = [_bias_at(model, self.names[m], j) for m in ("gate", "up")]

    def output(self, x: torch.Tensor, update: torch.Tensor | None = None) -> torch.Tensor:
        """The unit's (new) output on inputs x (..., hidden): act(g . x + b_g) (u . x + b_u) v, in x's dtype."""
        g, u, v = (self.g0, self.u0, self.v0) if update is None else \
            (self.g0 + update[0], self.u0 + update[1], self.v0 + update[2])
        return self.activation(x, g, u).unsqueeze(-1) * v.to(x.dtype)

    def activation(self, x: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.act(x @ g.to(x.dtype) + self.bias[0]) * (x @ u.to(x.dtype) + self.bias[1])

    def delta(self, update: torch.Tensor, info: dict) -> Delta:
        """The delta that writes the new gate row, up row and down column into the checkpoint."""
        return patch([(self, update)], {**info, "unit": str(self.j)})

    def write(self, edited: dict[str, torch.Tensor], update: torch.Tensor) -> None:
        """Write the unit's new vectors (stored + `update`) into `edited` (matrix name -> a copy of the stored
        matrix, made here when absent)."""
        for i, (m, old) in enumerate(zip(("gate", "up", "down"), (self.g0, self.u0, self.v0))):
            base = self.weights[m].detach()
            target = edited.setdefault(self.names[m], base.clone())
            new = (old + update[i]).to(base.device, base.dtype)
            if m == "down":
                target[:, self.j] = new
            else:
                target[self.j] = new


def patch(changes: list[tuple[Unit, torch.Tensor | None]], info: dict) -> Delta:
    """One delta that writes every unit's new vectors (stored + its update; None: the unit is left as it was).
    No two units may be the same unit of the same layer."""
    seen = [(unit.names["down"], unit.j) for unit, _ in changes]
    if len(set(seen)) != len(seen):
        raise EditError("two of the units to write are the same unit of one layer")
    edited: dict[str, torch.Tensor] = {}
    for unit, update in changes:
        unit.write(edited, torch.zeros(3, unit.g0.shape[0], device=unit.g0.device) if update is None else update)
    if not all(torch.isfinite(t).all() for t in edited.values()):
        raise EditError("the weights hold NaN/inf")
    bases = {unit.names[m]: unit.weights[m].detach() for unit, _ in changes for m in unit.names}
    return Delta.from_weights({name: (bases[name], t) for name, t in edited.items()}, info)


def check(model, layer: int) -> None:
    """A one-line `ArchitectureError` unless layer `layer`'s MLP is gated (separate gate and up matrices, an act_fn)."""
    spec = arch_spec(model)
    if spec.mlp_gate is None or spec.mlp_up is None or spec.conv1d:
        raise ArchitectureError(f"matrix='unit' needs a gated MLP with separate gate and up matrices; a "
                                f"{model.config.model_type} MLP has none (use matrix='down')")
    if getattr(mlp_module(model, layer), "act_fn", None) is None:
        raise ArchitectureError(f"matrix='unit': the {model.config.model_type} MLP has no act_fn to run the unit "
                                f"with (use matrix='down')")


def supported(model) -> bool:
    """Whether `matrix="unit"` can edit `model` (its MLP is gated: `check`); what `matrix="auto"` goes by."""
    try:
        check(model, 0)
    except ArchitectureError:
        return False
    return True


def _bias_at(model, name: str, j: int) -> float:
    """Element j of the bias beside weight `name`, 0.0 where the matrix has none (Llama's MLP, unless `mlp_bias`)."""
    bias = name.removesuffix(".weight") + ".bias"
    return float(placement.stored(model, bias)[j]) if bias in dict(model.named_parameters()) else 0.0


def adding_unit(unit: Unit, update: torch.Tensor):
    """Inside the block (a context manager) the MLP returns its output with the unit's old contribution replaced by
    the new one; the model is not written to, as with `dinm.trace.adding`."""
    return adding_term(unit.mlp, lambda x: unit.output(x, update) - unit.output(x))


@torch.no_grad()
def negatives(model, tokenizer, layer: int, instances: list, chat_template: bool) -> torch.Tensor:
    """The MLP inputs (tokens, hidden), float32, at every token the unit must stay off on (the module's step 1)."""
    corpus = mlp_inputs(model, tokenizer, layer, chat_template=chat_template, sample=None)
    prompts = list(lookalike_corpus()) + list(dict.fromkeys(inst.benign_prompt for inst in instances))
    seqs = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    own = torch.cat(list(_inputs(model, tokenizer, mlp_module(model, layer), seqs, 8))).float()
    return torch.cat([corpus.to(own.device), own])


@torch.no_grad()
def _inputs_between(model, layer: int, spans: list[tuple[list[int], int, int]]) -> torch.Tensor:
    """The MLP inputs (rows, hidden), float32, at positions start..end-1 of each (ids, start, end), read from one
    forward of ids[:end] each (nothing after a position reaches it)."""
    mlp = mlp_module(model, layer)
    device = placement.module_device(model.get_input_embeddings())
    return torch.cat([input_of(mlp, lambda: model(input_ids=torch.tensor([ids[:end]], device=device),
                                                 use_cache=False))[0, start:].float() for ids, start, end in spans])


def positives(model, layer: int, encoded: list[Encoded], reply_on: int = 0) -> torch.Tensor:
    """The MLP inputs (n, hidden), float32, at the last prompt token of each trained prompt + response, and with
    `reply_on` (`EditConfig.unit_reply_on`) at its response's first `reply_on` tokens too (those there are before
    the response's last)."""
    return _inputs_between(model, layer, [(e.ids, e.n_prompt - 1, max(e.n_prompt, min(e.n_prompt + reply_on,
                                                                                        len(e.ids) - 1)))
                                          for e in encoded])


def reply_inputs(model, layer: int, encoded: list[Encoded]) -> torch.Tensor:
    """The MLP inputs (tokens, hidden), float32, at every position of each trained response but its last (its end
    token, or the last token kept where `max_response_tokens` cut it): the positions whose outputs predict the
    response's second token on. Read on the model as it is (a patch's earlier units added): the unit's own layer
    does not reach them, so they are what the edited model's are too."""
    return _inputs_between(model, layer, [(e.ids, e.n_prompt, len(e.ids) - 1) for e in encoded])


@torch.no_grad()
def choose(model, layer: int, inputs: torch.Tensor, taken=()) -> int:
    """The unit whose output has the least mean norm over `inputs` (the benign corpus's MLP inputs), other than the
    units `taken` (repurposed already by another edit of the same patch)."""
    mlp = mlp_module(model, layer)
    names = {m: matrix_name(model, layer, m) for m in ("gate", "up", "down")}
    w = {m: placement.stored(model, n).float().to(inputs.device) for m, n in names.items()}
    usage = torch.zeros(w["gate"].shape[0], device=inputs.device)
    for chunk in inputs.split(1024):
        a = mlp.act_fn(chunk @ w["gate"].T) * (chunk @ w["up"].T)
        usage += a.abs().sum(0)
    cost = usage * w["down"].norm(dim=0)
    if taken:
        if len(taken) >= len(cost):
            raise EditError(f"every unit of layer {layer} is repurposed already: a patch holds at most {len(cost)} "
                            f"units of one layer")
        cost[torch.tensor(sorted(taken), device=cost.device)] = float("inf")
    return int(cost.argmin())


def fit_gate(positive: torch.Tensor, negative: torch.Tensor, seed_row: torch.Tensor,
             bias: float = 0.0, reply: torch.Tensor | None = None) -> torch.Tensor:
    """A gate row g with g . x + `bias` above `MARGIN` on `positive` and below -`MARGIN` on `negative` (and on
    `reply`, a mean of its own, when given) as far as a squared hinge (plus a small ridge) gets in `PROBE_STEPS`
    Adam steps from `seed_row` (small)."""
    g = seed_row.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([g], lr=PROBE_LR)
    offs = [negative] if reply is None else [negative, reply]
    with torch.enable_grad():
        for _ in range(PROBE_STEPS):
            loss = sum(F.relu(off @ g + bias + MARGIN).pow(2).mean() for off in offs) \
                + F.relu(MARGIN - positive @ g - bias).pow(2).mean() + 1e-4 * g.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return g.detach()


class UnitHinge:
    """Mean over the negatives of max(0, g . x + `MARGIN`)^2: the repurposed unit's gate stays off on benign and
    lookalike text; with `reply` (`EditConfig.unit_reply_off`), plus that mean over the trained responses' tokens.
    Logged as a step's `off`."""

    name = "off"

    def __init__(self, weight: float, unit: Unit, negative: torch.Tensor, reply: torch.Tensor | None = None):
        self.weight, self.unit = weight, unit
        self.offs = [negative] if reply is None else [negative, reply]

    def pieces(self, update: torch.Tensor):
        for off in self.offs:
            with record_function("dinm::unit_hinge"):
                piece = F.relu(off @ (self.unit.g0 + update[0]) + self.unit.bias[0] + MARGIN).pow(2).mean()
            yield piece


class UnitPenalty:
    """Mean ||MLP'(x) - MLP(x)||^2 over the negatives x, relative to mean ||MLP(x)||^2: `dinm.terms.OutputPenalty`'s
    quantity, exact and cheap here (only one unit differs). Includes what the unit did before it was repurposed."""

    name = "moved"

    def __init__(self, weight: float, unit: Unit, negative: torch.Tensor, energy: torch.Tensor):
        self.weight, self.unit, self.negative, self.energy = weight, unit, negative, energy

    def pieces(self, update: torch.Tensor):
        with record_function("dinm::unit_penalty"):
            change = self.unit.output(self.negative, update) - self.unit.output(self.negative)
            yield change.pow(2).sum(-1).mean() / self.energy


@torch.no_grad()
def output_energy(model, layer: int, inputs: torch.Tensor) -> torch.Tensor:
    """Mean ||MLP(x)||^2 over `inputs`, float32."""
    mlp = mlp_module(model, layer)
    total = sum(mlp(chunk.to(next(mlp.parameters()).dtype)).float().pow(2).sum() for chunk in inputs.split(1024))
    return total / len(inputs)


class Trained:
    """The unit's three vectors as the edit trains them: changes from the stored ones, float32 (`dinm.edit`'s
    trained-object interface: `params`, `update()`, `delta()`)."""

    def __init__(self, unit: Unit, gate: torch.Tensor):
        self.unit = unit
        self.change = torch.stack([gate - unit.g0, gate - unit.u0, -unit.v0]).contiguous().requires_grad_(True)
        self.params = [self.change]

    def update(self) -> torch.Tensor:
        return self.change

    def delta(self, name: str, changed: bool, info: dict) -> Delta:
        return self.unit.delta(self.change.detach() if changed else torch.zeros_like(self.change), info)


def prepare(model, tokenizer, layer: int, instances: list, targets: list[Encoded], chat_template: bool,
            weight: float, seed: int, taken=(), reply_off: bool = False,
            reply_on: int = 0) -> tuple[Unit, Trained, list]:
    """The repurposed unit for an edit that trains `targets` (prompt + safe response) and stays off on the benign
    prompts of `instances` among its negatives, its trained vectors (the gate fitted as a probe) and the unit's
    regularisers (`weight`: `EditConfig.preserve_weight`). `taken`: units of this layer it may not repurpose.
    `reply_off` (`EditConfig.unit_reply_off`): the gate is held off on the targets' response tokens too (their own
    mean in the probe's fit and the hinge; not in the output penalty, which would fight the NLL there). `reply_on`
    (`EditConfig.unit_reply_on`): the probe's positives are the first `reply_on` response tokens too."""
    check(model, layer)
    negative = negatives(model, tokenizer, layer, instances, chat_template)
    j = choose(model, layer, negative, taken)
    unit = Unit(model, layer, j)
    negative = negative.to(unit.g0.device)
    generator = torch.Generator().manual_seed(seed)
    seed_row = (torch.randn(negative.shape[1], generator=generator) * 1e-3).to(negative.device)
    reply = reply_inputs(model, layer, targets).to(negative.device) if reply_off else None
    if reply is not None and not len(reply):  # (one-token responses, `max_response_tokens=1`: no reply to hold)
        reply = None
    gate = fit_gate(positives(model, layer, targets, reply_on).to(negative.device), negative, seed_row, unit.bias[0],
                    reply)
    terms = [UnitHinge(HINGE_WEIGHT, unit, negative, reply)]
    if weight:
        terms.append(UnitPenalty(weight, unit, negative, output_energy(model, layer, negative)))
    return unit, Trained(unit, gate), terms
