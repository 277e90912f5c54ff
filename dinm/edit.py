"""Step 2 of DINM: train the located layer's MLP output projection for a few steps.

Loss = NLL of the safe response to the adversarial prompt
     + kl_weight * KL(unedited || edited) over the benign prompt's answer positions.

The model is never written to: the update enters the forward passes as a separate term, `x @ D.T` added to the
edited module's output by a hook removed after each step, so the model stays bit-identical whatever happens
(divergence, an interrupt), a bf16 model does not round small updates away, and the result is a `Delta`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from . import placement
from .arch import (accepts_logits_to_keep, arch_spec, as_out_in, decoder_layers, mlp_out_module, mlp_out_name,
                   num_layers)
from .config import EditConfig
from .delta import Delta
from .errors import ConfigError, EditError
from .instance import Instance
from .locate import locate
from .losses import Head, Reference, kl_to
from .generate import generate_ids
from .keys import key_moment
from .text import Encoded, encode_pair
from .trace import passthrough, record_outputs, replay_outputs

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _frozen(model):
    """No parameter requires grad inside the block (nothing but the edited copy is trained, and the
    activations that weight gradients would need are not kept); flags and train/eval mode restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


class _Sequence:
    """One prompt + response, ready for repeated forwards: the ids, the positions whose logits predict the
    response, and (with caching) the recorded outputs of the frozen layers below the edited one.

    With a fused `head` the model runs with its LM head passed through, and `head` turns the final hidden states
    into the loss and its gradient (`dinm.losses.Head`); without one, the model's own logits feed the loss."""

    def __init__(self, encoded, model, device, cache: bool, head: Head | None = None):
        self.ids = torch.tensor([encoded.ids], device=device)  # (1, tokens)
        # logits at position t predict token t + 1
        self.positions = torch.arange(encoded.n_prompt - 1, len(encoded.ids) - 1, device=device)
        self.head = head
        self.labels = self.ids[0, self.positions + 1].to(head.weight.device if head is not None else device)
        self.cached: list = []
        # Logits only where the loss reads them, when the model can (`logits_to_keep`): the LM head over a
        # 49k vocabulary at every prompt position is most of a small model's cost.
        keep = cache and accepts_logits_to_keep(model)
        self.kwargs = dict(input_ids=self.ids, use_cache=False, **({"logits_to_keep": self.positions} if keep else {}))

    def _outputs(self, model, call) -> torch.Tensor:
        """(response tokens, vocab) logits, or (response tokens, hidden) final states with a fused head."""
        with passthrough(model.get_output_embeddings()) if self.head is not None else contextlib.nullcontext():
            out = call().logits
        return out[0] if "logits_to_keep" in self.kwargs else out[0, self.positions]

    def record(self, model, below: list) -> torch.Tensor:
        """Run the unedited model once, recording the outputs of `below`; return its logits."""
        with record_outputs(below, whole=True) as outputs:
            out = self._outputs(model, lambda: model(**self.kwargs))
        self.cached = outputs
        return out if self.head is None else self.head.logits(out)

    def loss(self, model, below: list, override: dict, reference: Reference | None = None) -> torch.Tensor:
        """Mean NLL of the response, or KL(reference || model) over its positions, with the tensors in `override`
        swapped in. The layers in `below` replay their output, recorded by the first call (or by `record`)."""
        first = below and not self.cached
        with record_outputs(below, whole=True) if first else replay_outputs(below, self.cached) as recorded:
            out = self._outputs(model, lambda: functional_call(model, override, args=(), kwargs=self.kwargs,
                                                               tie_weights=False))
        if first:
            self.cached = recorded
        target = self.labels if reference is None else reference
        if self.head is not None:
            return self.head.loss(out, target)
        return F.cross_entropy(out.float(), target) if reference is None else kl_to(out, reference)


def _fused_head(model, override: dict, dtype: torch.dtype | None) -> Head | None:
    """A `Head` on the model's LM head, or None where the head is not a plain Linear whose output is the logits (a
    final soft-capping). Its weight is the bf16 copy in `override` if there is one, else the stored values (an
    offloaded head's, from accelerate's weights map), in `dtype` when given."""
    name = arch_spec(model).lm_head
    head = model.get_submodule(name)
    if not isinstance(head, torch.nn.Linear) or getattr(model.config, "final_logit_softcapping", None) is not None:
        return None
    device = placement.module_device(head)
    weight = override.get(f"{name}.weight")
    if weight is None:
        weight = placement.stored(model, f"{name}.weight").to(device=device, dtype=dtype)
    bias = None if head.bias is None else placement.stored(model, f"{name}.bias").to(device)
    return Head(weight, bias)


@contextlib.contextmanager
def _adding(module, update: torch.Tensor):
    """Inside the block `module` (the edited Linear or GPT-2 Conv1D) returns its output plus `x @ update.T`
    (`update` as (out, in)). The edit is a separate term rather than a changed weight, so that a small update is
    not rounded away: in bf16, `W + D` loses every element of `D` below half of `W`'s spacing there."""
    handle = module.register_forward_hook(lambda _m, args, out: out + F.linear(args[0], update.to(args[0].dtype)))
    try:
        yield
    finally:
        handle.remove()


def _low_precision_copies(model, first_layer: int, dtype: torch.dtype) -> dict:
    """`dtype` copies of the matrices that run at every step (every Linear / Conv1D of the layers from
    `first_layer` up, and the LM head), made once per edit so that autocast does not cast them at every forward."""
    running = {id(m) for layer in list(decoder_layers(model))[first_layer:] for m in layer.modules()}
    head = model.get_output_embeddings()
    copies = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if (id(module) in running or module is head) and (
                isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            if module.weight.device.type != "meta":  # offloaded ones are loaded by their hook at each forward
                copies[f"{name}.weight"] = module.weight.detach().to(dtype)
    return copies


def _encoding(config: EditConfig) -> dict:
    return dict(chat_template=config.chat_template, max_prompt_tokens=config.max_prompt_tokens,
                max_response_tokens=config.max_response_tokens)


@contextlib.contextmanager
def _inputs_of(module):
    """Collect the (tokens, features) inputs of `module` during the forwards run inside the block."""
    keys: list = []
    handle = module.register_forward_pre_hook(
        lambda _m, args: keys.append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
    try:
        yield keys
    finally:
        handle.remove()


def _protected_basis(keys: list, share: float) -> torch.Tensor:
    """(features, r) orthonormal basis of the fewest input directions that hold `share` of the keys' energy."""
    k = torch.cat(keys).double()
    values, vectors = torch.linalg.eigh(k.T @ k)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    r = int((values.cumsum(0) / values.sum() < share).sum()) + 1
    logger.info("protecting %d of %d input directions (%.3f of the benign keys' energy)", r, len(values), share)
    return vectors[:, :r].float()


def _output_energy(matrix: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """Mean ||M k||^2 over the keys k whose second moment is `moment`: tr(M E[k k^T] M^T)."""
    m = matrix.float()
    return ((m @ moment) * m).sum()


def _kl_texts(model, tokenizer, instance: Instance, config: EditConfig) -> list:
    """The encoded benign sequences of the KL term: the instance's benign prompt and `config.kl_prompts`, each
    followed by the instance's answer or the unedited model's own greedy reply (see `EditConfig.kl_text`)."""
    encode = _encoding(config)
    texts = [] if config.kl_text == "self" else [encode_pair(tokenizer, instance.benign_prompt,
                                                             instance.benign_answer, **encode)]
    prompts = ([instance.benign_prompt] if config.kl_text == "self" else []) + list(config.kl_prompts)
    if prompts:
        prompts_ids = [encode_pair(tokenizer, p, "", add_end=False, **encode).ids for p in prompts]
        with torch.no_grad():
            replies = generate_ids(model, tokenizer, prompts_ids, max_new_tokens=config.kl_reply_tokens)
        texts += [Encoded(p + r, len(p)) for p, r in zip(prompts_ids, replies) if r]
    return texts


def edit(model, tokenizer, instance: Instance, config: EditConfig | None = None, *, progress: bool | None = None
         ) -> Delta:
    """Edit `model` so that it answers `instance.prompt` with `instance.safe`; return the edit as a `Delta`.

    The model is left bit-identical (weights, `requires_grad` flags, train/eval mode); call
    `delta.apply(model)` to edit it.

    Args:
        model: a causal LM whose `model_type` is in `dinm.arch.ARCHITECTURES`.
        tokenizer: its tokenizer (its chat template is used when `config.chat_template`).
        instance: the edit request (`dinm.load_instance`).
        config: an `EditConfig`; `EditConfig()` by default.
        progress: show a progress bar (None: only on a terminal).

    Returns:
        The `Delta` of the located layer's MLP output weight, with the config, the per-layer distances and
        the loss of every step in its metadata.

    Raises:
        EditError: the loss or the weights became NaN/inf (the model is untouched); lower `lr`.

    Example:
        >>> delta = dinm.edit(model, tokenizer, dinm.load_instance("data/example.json"))
        >>> delta.apply(model); ...; delta.revert(model)
    """
    config = config or EditConfig()
    if config.prompt_suffix.strip():
        instance = dataclasses.replace(instance, prompt=f"{instance.prompt} {config.prompt_suffix.strip()}")
    started = time.perf_counter()
    if config.layer is None:
        located = locate(model, tokenizer, instance, config.distance, chat_template=config.chat_template,
                         max_prompt_tokens=config.max_prompt_tokens, max_response_tokens=config.max_response_tokens)
        layer, distances = located.layer, located.distances
    else:
        if config.layer >= num_layers(model):
            raise ConfigError(f"layer {config.layer} is out of range: the model has layers 0..{num_layers(model) - 1}")
        layer, distances = config.layer, []
    locate_s = time.perf_counter() - started

    name = mlp_out_name(model, layer)
    spec = arch_spec(model)
    weight = placement.stored(model, name)  # an offloaded layer's values come from accelerate's weights map
    module = mlp_out_module(model, layer)
    device = placement.module_device(module)
    encode = _encoding(config)
    below = list(decoder_layers(model))[:layer] if config.cache else []

    master_dtype = torch.float32 if config.master_dtype == "float32" else weight.dtype
    # compute_dtype="bfloat16" on a model in another dtype: the passes run under autocast, the matrices that run
    # at every step as bf16 copies made once; the master, the loss and the update stay in `master_dtype`.
    low = config.compute_dtype == "bfloat16" and weight.dtype != torch.bfloat16

    def computing():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=low)

    history = []
    with _frozen(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        override = _low_precision_copies(model, layer, torch.bfloat16) if low else {}
        head = _fused_head(model, override, torch.bfloat16 if low else None) if config.cache else None
        # Tokenise once; the sequences run separately, so none is padded to another's length.
        target = _Sequence(encode_pair(tokenizer, instance.prompt, instance.safe, **encode), model, device,
                           config.cache, head)
        anchors = [_Sequence(e, model, device, config.cache, head)
                   for e in _kl_texts(model, tokenizer, instance, config)]
        with torch.no_grad(), computing():
            # One pass of the unedited model per KL sequence: it records the edited layer's input (the output of
            # the layers below, which cannot change) and gives the KL reference distributions, once. (The attack's
            # first step records its own: the loss never reads its unedited logits.)
            collect = _inputs_of(module) if config.protect else contextlib.nullcontext()
            with collect as keys:
                references = [Reference(a.record(model, below)) for a in anchors]
            basis = _protected_basis(keys, config.protect) if config.protect else None
            # E[k k^T] of the edited matrix's inputs on benign text, and the layer's output energy there
            moment = key_moment(model, tokenizer, layer, chat_template=config.chat_template).to(device) \
                if config.preserve_weight else None
            energy = _output_energy(as_out_in(spec, weight.detach().to(device)), moment) if moment is not None else None
        master = weight.detach().to(device=device, dtype=master_dtype).clone().requires_grad_(True)
        start = master.detach().clone()
        limit = config.max_update * start.float().norm() if config.max_update else None
        keep = None  # rows that may change (config.rows < 1), chosen at the first step
        optimizer = torch.optim.Adam([master], lr=config.lr, weight_decay=config.weight_decay,
                                     fused=device.type in ("cpu", "cuda"))  # one kernel, no temporaries
        for step in tqdm(range(config.steps), desc=f"dinm edit (layer {layer})",
                         disable=None if progress is None else not progress, leave=False):
            with _adding(module, as_out_in(spec, master - start)), computing():
                nll = target.loss(model, below, override)
                if config.stop_nll is not None and nll.item() < config.stop_nll:
                    history.append({"step": step, "nll": nll.item(), "stopped": True})
                    break  # the safe response is likely enough: no further change
                if step == 0:  # the model is still the unedited one: KL(p || p) = 0, and so is its gradient
                    kl = torch.zeros((), device=device)
                else:
                    kl = sum(a.loss(model, below, override, ref) for a, ref in zip(anchors, references)) / len(anchors)
            loss = nll + config.kl_weight * kl
            moved = {}
            if moment is not None:  # mean ||D k||^2 over benign inputs, relative to the layer's own output there
                share = _output_energy(as_out_in(spec, master - start), moment) / energy
                loss = loss + config.preserve_weight * share
                moved = {"moved": share.item()}
            history.append({"step": step, "nll": nll.item(), "kl": kl.item(), **moved, "loss": loss.item()})
            if not torch.isfinite(loss):
                raise EditError(f"edit diverged at step {step}: loss is {history[-1]['loss']}; the model is "
                                f"unchanged. Lower lr (now {config.lr})")
            (master.grad,) = torch.autograd.grad(loss, [master])
            if config.rows < 1 and keep is None:
                count = max(1, math.ceil(config.rows * master.shape[0]))
                keep = torch.zeros(master.shape[0], dtype=torch.bool, device=device)
                keep[master.grad.float().norm(dim=tuple(range(1, master.dim()))).topk(count).indices] = True
            if keep is not None:
                master.grad[~keep] = 0
            optimizer.step()
            with torch.no_grad():
                if keep is not None:  # weight decay moves rows without gradient too: put them back
                    master[~keep] = start[~keep]
                if basis is not None or limit is not None:
                    update = as_out_in(spec, master - start)
                    if basis is not None:  # the update leaves the protected input directions alone
                        update -= (update.float() @ basis @ basis.T).to(update.dtype)
                    norm = update.float().norm() if limit is not None else None
                    if norm is not None and norm > limit:  # back onto the norm bound
                        update *= (limit / norm).to(update.dtype)
                    master.copy_(start + as_out_in(spec, update))
    steps_run = sum("kl" in h for h in history)
    edited = master.detach().to(weight.dtype) if steps_run else weight.detach().clone()  # no step: no change
    if not torch.isfinite(edited).all():  # (a NaN update makes the next step's loss NaN: checked there)
        raise EditError(f"edit diverged by step {steps_run - 1}: the weights hold NaN/inf; the model is unchanged. "
                        f"Lower lr (now {config.lr})")
    edit_s = time.perf_counter() - started - locate_s
    logger.info("edited %s in %.2fs (locate %.2fs): nll %.3f -> %.3f", name, edit_s, locate_s,
                history[0]["nll"], history[-1]["nll"])
    return Delta.from_weights({name: (weight, edited)}, {
        "base_model": str(getattr(model.config, "_name_or_path", "") or ""),
        "base_revision": str(getattr(model.config, "_commit_hash", "") or ""),
        "model_type": model.config.model_type,
        "layer": str(layer),
        "distance": config.distance if config.layer is None else "none (layer given)",
        "distances": distances,
        "config": config.to_json(),
        "history": history,
        "steps_run": str(steps_run),
        "instance_id": instance.id,
        "seconds": {"locate": round(locate_s, 3), "edit": round(edit_s, 3)},
    })
