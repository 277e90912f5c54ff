"""Step 2 of DINM: train the located layer's MLP output projection for a few steps.

Loss = NLL of the safe response to the adversarial prompt
     + kl_weight * KL(unedited || edited) over the benign prompt's answer positions.

The model is never written to: the edited matrix is passed through `torch.func.functional_call`, so the
model stays bit-identical whatever happens (divergence, an interrupt), and the result is a `Delta`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from .arch import accepts_logits_to_keep, decoder_layers, mlp_out_name, num_layers
from .config import EditConfig
from .delta import Delta
from .errors import ConfigError, EditError
from .instance import Instance
from .locate import locate
from .text import encode_pair
from .trace import record_outputs, replay_outputs

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
    response, and (with caching) the recorded outputs of the frozen layers below the edited one."""

    def __init__(self, encoded, model, device, cache: bool):
        self.ids = torch.tensor([encoded.ids], device=device)  # (1, tokens)
        # logits at position t predict token t + 1
        self.positions = torch.arange(encoded.n_prompt - 1, len(encoded.ids) - 1, device=device)
        self.labels = self.ids[0, self.positions + 1]
        self.cached: list = []
        # Logits only where the loss reads them, when the model can (`logits_to_keep`): the LM head over a
        # 49k vocabulary at every prompt position is most of a small model's cost.
        keep = cache and accepts_logits_to_keep(model)
        self.kwargs = dict(input_ids=self.ids, use_cache=False, **({"logits_to_keep": self.positions} if keep else {}))

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        kept = "logits_to_keep" in self.kwargs
        return logits[0] if kept else logits[0, self.positions]  # (response tokens, vocab)

    def record(self, model, below: list) -> torch.Tensor:
        """Run the unedited model once, recording the outputs of `below`; return its logits."""
        with record_outputs(below, whole=True) as outputs:
            logits = model(**self.kwargs).logits
        self.cached = outputs
        return self._select(logits)

    def logits(self, model, below: list, override: dict) -> torch.Tensor:
        """Logits with the parameters in `override` swapped in; the layers in `below` replay their output."""
        with replay_outputs(below, self.cached):
            return self._select(functional_call(model, override, args=(), kwargs=self.kwargs).logits)


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
    weight = model.get_parameter(name)
    device = weight.device
    encode = dict(chat_template=config.chat_template, max_prompt_tokens=config.max_prompt_tokens,
                  max_response_tokens=config.max_response_tokens)
    # Tokenise once; the two sequences run separately, so neither is padded to the other's length.
    target = _Sequence(encode_pair(tokenizer, instance.prompt, instance.safe, **encode), model, device, config.cache)
    benign = _Sequence(encode_pair(tokenizer, instance.benign_prompt, instance.benign_answer, **encode), model,
                       device, config.cache)
    below = list(decoder_layers(model))[:layer] if config.cache else []

    master_dtype = torch.float32 if config.master_dtype == "float32" else weight.dtype
    history = []
    with _frozen(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        with torch.no_grad():
            # One pass of the unedited model per sequence: it records the edited layer's input (the output of
            # the layers below, which cannot change) and gives the KL reference distribution, once.
            target.record(model, below)
            ref_logp = F.log_softmax(benign.record(model, below).float(), dim=-1)
        master = weight.detach().to(master_dtype).clone().requires_grad_(True)
        start = master.detach().clone() if config.rows < 1 else None  # to put back the rows outside the mask
        keep = None  # rows that may change (config.rows < 1), chosen at the first step
        optimizer = torch.optim.Adam([master], lr=config.lr, weight_decay=config.weight_decay)
        for step in tqdm(range(config.steps), desc=f"dinm edit (layer {layer})",
                         disable=None if progress is None else not progress, leave=False):
            override = {name: master.to(weight.dtype)}
            nll = F.cross_entropy(target.logits(model, below, override).float(), target.labels)
            logp = F.log_softmax(benign.logits(model, below, override).float(), dim=-1)
            kl = F.kl_div(logp, ref_logp, log_target=True, reduction="batchmean")
            loss = nll + config.kl_weight * kl
            history.append({"step": step, "nll": nll.item(), "kl": kl.item(), "loss": loss.item()})
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
            if keep is not None:
                with torch.no_grad():  # weight decay moves rows without gradient too: put them back
                    master[~keep] = start[~keep]
            edited = master.detach().to(weight.dtype)
            if not torch.isfinite(edited).all():
                raise EditError(f"edit diverged at step {step}: the weights hold NaN/inf; the model is unchanged. "
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
        "instance_id": instance.id,
        "seconds": {"locate": round(locate_s, 3), "edit": round(edit_s, 3)},
    })
