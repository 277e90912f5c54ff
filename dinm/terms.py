"""The regularisers of an edit: each a small object with a name (the `dinm.history.Step` field it is logged as),
a weight, and `pieces(update)`, the parts (one per sequence it runs) whose sum is the term's value for an update
(out, in) of the edited matrix, each with a gradient. `build` makes them from an `EditConfig`, in one place;
`dinm.edit` adds `weight * sum(pieces)` to the NLL, one piece's backward at a time, so that a batch edit never
holds the graphs of all its benign sequences at once.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.func import functional_call
from torch.profiler import record_function

from . import placement
from .arch import mlp_module, mlp_name
from .config import EditConfig
from .generate import generate_ids
from .instance import Instance
from .keys import hooked, key_moment, mlp_inputs, weight_sums
from .passes import Passes, Sequence
from .text import Encoded, encode_pair, end_of_reply_id, pad_id
from .trace import adding

logger = logging.getLogger(__name__)


class BenignKL:
    """KL(unedited || edited) over the answer positions of the benign sequences, their mean: the edit keeps the
    model's next-token distributions where it should not act (the paper's term, with a gradient here)."""

    name = "kl"

    def __init__(self, weight: float, passes: Passes, sequences: list[Sequence]):
        self.weight, self.passes, self.sequences = weight, passes, sequences
        self.unedited = [passes.unedited(s) for s in sequences]  # one pass each, before the first step

    def pieces(self, update: torch.Tensor):
        # The unedited model (or no benign text): KL(p || p) = 0, and so is its gradient; no pass needed.
        if not self.sequences or not update.any():
            yield torch.zeros((), device=self.passes.device)
            return
        for s, u in zip(self.sequences, self.unedited):
            with record_function("dinm::kl_pass"):
                piece = self.passes.loss(s, update, u) / len(self.sequences)
            yield piece


class KeyPenalty:
    """Mean ||D k||^2 over the benign keys k of the edited matrix (`dinm.keys`), relative to the matrix's own
    mean ||W k||^2 there: what the update does to everyday inputs, at the cost of a small product per step."""

    name = "moved"

    def __init__(self, weight: float, moment: torch.Tensor, matrix: torch.Tensor):
        self.weight, self.moment = weight, moment
        self.energy = _output_energy(matrix, moment)

    def pieces(self, update: torch.Tensor):
        with record_function("dinm::key_penalty"):
            piece = _output_energy(update, self.moment) / self.energy
        yield piece


class OutputPenalty:
    """For an edit of the MLP's input side (`EditConfig.matrix` "gate" or "up"): mean ||MLP'(x) - MLP(x)||^2 over a
    fixed sample of benign-corpus tokens' MLP inputs x (`dinm.keys.mlp_inputs`), relative to mean ||MLP(x)||^2, with
    MLP' the block with the update added to the edited matrix. For an edit of the output matrix this is exactly
    `KeyPenalty`'s value (MLP' - MLP = D k there); through a nonlinearity it has no closed form, so the block runs on
    the sample at each step: three (tokens, hidden) x (hidden, inner) products and their backward. It runs in float32
    whatever the model's dtype (the difference of two bf16 passes would be mostly rounding)."""

    name = "moved"

    def __init__(self, weight: float, inputs: torch.Tensor, mlp: torch.nn.Module, module: torch.nn.Module,
                 weights: dict[str, torch.Tensor]):
        self.weight, self.inputs, self.mlp, self.module = weight, inputs, mlp, module
        self.weights = {name: w.float() for name, w in weights.items()}  # the block's stored values, float32
        with torch.no_grad():
            self.unedited = self._run(None)
            self.energy = self.unedited.pow(2).sum(-1).mean()

    def _run(self, update: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.inputs.device.type, enabled=False), \
                (adding(self.module, update) if update is not None else contextlib.nullcontext()):
            out = functional_call(self.mlp, self.weights, (self.inputs,), tie_weights=False)
        return out[0] if isinstance(out, tuple) else out

    def pieces(self, update: torch.Tensor):
        with record_function("dinm::output_penalty"):
            piece = (self._run(update.float()) - self.unedited).pow(2).sum(-1).mean() / self.energy
        yield piece


# How far `UnsafeHinge` pushes the unsafe response's mean NLL per token above the unedited model's: 1 nat, its
# tokens on average e (2.7) times less likely. Beyond it the term is 0 and leaves the rest to the other terms.
UNSAFE_MARGIN = 1.0


class UnsafeHinge:
    """max(0, goal - NLL) of the unsafe response to the adversarial prompt, averaged over the instances, with goal the
    unedited model's NLL + `UNSAFE_MARGIN`: the edit makes the harmful reply less likely, not only the safe one more
    likely (`EditConfig.unsafe_weight`), and stops pushing once it is `UNSAFE_MARGIN` nats per token less likely."""

    name = "unsafe"

    def __init__(self, weight: float, passes: Passes, sequences: list[Sequence], shape: torch.Size,
                 margin: float = UNSAFE_MARGIN):
        self.weight, self.passes, self.sequences = weight, passes, sequences
        zero = torch.zeros(shape, device=passes.device)  # (the first pass also records the frozen layers below)
        with torch.no_grad():
            self.goals = [passes.loss(s, zero).detach() + margin for s in sequences]

    def pieces(self, update: torch.Tensor):
        for s, goal in zip(self.sequences, self.goals):
            with record_function("dinm::unsafe_pass"):
                piece = torch.relu(goal - self.passes.loss(s, update)) / len(self.sequences)
            yield piece


def _output_energy(matrix: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """Mean ||M k||^2 over the keys k whose second moment is `moment`: tr(M E[k k^T] M^T), with its gradient."""
    return _Energy.apply(matrix.float(), moment)


class _Energy(torch.autograd.Function):
    """tr(M C M^T) = sum((M C) * M) for a symmetric C, whose gradient 2 M C reuses the forward's product: one
    (out, in) x (in, in) product per step where autograd would make two (the forward's and M C^T in the backward)."""

    @staticmethod
    def forward(ctx, m, moment):
        product = m @ moment
        ctx.save_for_backward(product)
        return (product * m).sum()

    @staticmethod
    def backward(ctx, grad):
        (product,) = ctx.saved_tensors
        return product * (2 * grad), None


def build(model, tokenizer, instances: Instance | list[Instance], layer: int, passes: Passes,
          matrix: torch.Tensor, config: EditConfig, seconds: dict | None = None) -> list:
    """The regularisers `config` asks for, in the order their weighted penalties are added to the NLL. `matrix` is
    the edited matrix (out, in) as it is before the edit (for `matrix="unit"`, a zero update of the unit: its penalties
    are `dinm.unit`'s); the KL reads the benign prompts of all `instances`.
    `seconds`, when given, gets the time spent on the model's own benign replies ("reply") and on the benign-key
    statistic ("keys")."""
    seconds = {} if seconds is None else seconds
    instances = [instances] if isinstance(instances, Instance) else instances
    started = time.perf_counter()
    with record_function("dinm::own_reply"):
        texts = benign_texts(model, tokenizer, instances, config)
    seconds["reply"] = time.perf_counter() - started
    if not texts:
        logger.warning("the model's own reply to the benign prompt is empty: the KL term has nothing to read")
    terms: list = [BenignKL(config.kl_weight, passes, [passes.sequence(e, precise=True) for e in texts])]
    if config.preserve_weight and config.matrix != "unit":
        started = time.perf_counter()
        with record_function("dinm::key_statistic"):
            if config.matrix == "down":
                moment = key_moment(model, tokenizer, layer, chat_template=config.chat_template).to(passes.device)
                terms.append(KeyPenalty(config.preserve_weight, moment, matrix.to(passes.device)))
            else:
                inputs = mlp_inputs(model, tokenizer, layer, chat_template=config.chat_template)
                mlp, prefix = mlp_module(model, layer), mlp_name(model, layer)
                weights = {name: placement.stored(model, f"{prefix}.{name}").to(passes.device)
                           for name, _ in mlp.named_parameters()}
                terms.append(OutputPenalty(config.preserve_weight, inputs.to(passes.device), mlp, passes.module,
                                           weights))
        seconds["keys"] = time.perf_counter() - started
    if config.unsafe_weight:
        terms.append(UnsafeHinge(config.unsafe_weight, passes, [
            passes.sequence(encode_pair(tokenizer, inst.prompt, inst.unsafe, **config.encoding()))
            for inst in instances], matrix.shape))
    return terms


def benign_texts(model, tokenizer, instances: Instance | list[Instance], config: EditConfig) -> list[Encoded]:
    """The KL term's sequences, one per distinct benign prompt of `instances`: the prompt followed by its benign
    answer (`kl_text="answer"`) or the unedited model's own greedy reply (`"self"`, generated here, in batches)."""
    encode = config.encoding()
    instances = [instances] if isinstance(instances, Instance) else instances
    pairs = list(dict.fromkeys((inst.benign_prompt, inst.benign_answer) for inst in instances))
    if config.kl_text == "answer":
        return [encode_pair(tokenizer, prompt, answer, **encode) for prompt, answer in pairs]
    prompts = [encode_pair(tokenizer, p, "", add_end=False, **encode).ids
               for p in dict.fromkeys(prompt for prompt, _ in pairs)]
    replies = own_replies(model, tokenizer, prompts, config.kl_reply_tokens)
    return [Encoded(prompt + reply, len(prompt)) for prompt, reply in zip(prompts, replies) if reply]


_REPLIES: dict = {}  # (model, weight sums, prompt ids, tokens) -> reply ids: the last edits' own replies
_REPLIES_SIZE = 64


def own_replies(model, tokenizer, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """The model's greedy replies (ids, up to `tokens`) to `prompts` (ids), generated in batches for those not
    kept from an earlier edit in this process of the same model in the same state (every parameter's sum, dtype and
    device, and its generation config, are compared: an applied delta is a miss), and kept for the next: a second
    edit of an instance, with other settings or in a sweep, does not generate its benign reply again (4-5 s for 64
    tokens of SmolLM2-135M on 2 cores). A model with offloaded parameters (accelerate's device_map) is not cached:
    their values cannot be read cheaply; nor is a `keys.hooked` one (its replies are not those of its weights). The
    tokenizer's padding and end tokens are compared too."""
    params = list(model.parameters())
    cached = not any(p.device.type == "meta" for p in params) and not hooked(model)
    state = (id(model), weight_sums(params), tuple(sorted({f"{p.dtype} {p.device}" for p in params})),
             model.generation_config.to_json_string(), pad_id(tokenizer), end_of_reply_id(tokenizer)) \
        if cached else None
    keys = [(state, tuple(prompt), tokens) for prompt in prompts]
    replies = [_REPLIES.get(key) if cached else None for key in keys]
    missing = [i for i, reply in enumerate(replies) if reply is None]
    if missing:
        with torch.no_grad():
            made = generate_ids(model, tokenizer, [prompts[i] for i in missing], max_new_tokens=tokens)
        for i, reply in zip(missing, made):
            replies[i] = tuple(reply)
            if cached:
                _REPLIES[keys[i]] = replies[i]
                if len(_REPLIES) > _REPLIES_SIZE:
                    _REPLIES.pop(next(iter(_REPLIES)))
    return [list(reply) for reply in replies]


def forget_replies() -> None:
    """Drop the replies `own_replies` keeps (benchmarks time an edit as the first of its instance)."""
    _REPLIES.clear()
