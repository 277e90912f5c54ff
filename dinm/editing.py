"""Step 2 of DINM: train the located layer's MLP output projection for a few steps.

Loss = NLL of the safe response to the adversarial prompt + the weighted penalties of the regularisers
(`dinm.terms`: the KL on the benign prompt's answer, the benign-key penalty). The passes that compute it never
write to the model (`dinm.passes`); the result is a `Delta`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from tqdm.auto import tqdm

from . import placement, terms
from .arch import as_out_in, mlp_out_module, mlp_out_name, num_layers
from .config import EditConfig
from .delta import Delta
from .errors import ConfigError, EditError
from .history import Step
from .instance import Instance
from .locating import locate
from .passes import Passes, frozen
from .text import encode_pair

logger = logging.getLogger(__name__)


def edit(model, tokenizer, instance: Instance, config: EditConfig | None = None, *, progress: bool | None = None
         ) -> Delta:
    """Edit `model` so that it answers `instance.prompt` with `instance.safe`; return the edit as a `Delta`.

    The model is left bit-identical (weights, `requires_grad` flags, train/eval mode); call
    `delta.apply(model)`, or `with delta.applied(model): ...`, to edit it.

    Args:
        model: a causal LM whose `model_type` is in `dinm.arch.ARCHITECTURES`.
        tokenizer: its tokenizer (its chat template is used when `config.chat_template`).
        instance: the edit request (`dinm.load_instance`).
        config: an `EditConfig`; `EditConfig()` by default.
        progress: show a progress bar (None: only on a terminal).

    Returns:
        The `Delta` of the located layer's MLP output weight, with the config, the per-layer distances and
        the record of every step (`dinm.Step`) in its metadata.

    Raises:
        EditError: the loss or the weights became NaN/inf (the model is untouched); lower `lr`.

    Example:
        >>> delta = dinm.edit(model, tokenizer, dinm.load_instance("data/example.json"))
        >>> with delta.applied(model): ...
    """
    config = config or EditConfig()
    if config.prompt_suffix.strip():
        instance = dataclasses.replace(instance, prompt=f"{instance.prompt} {config.prompt_suffix.strip()}")
    started = time.perf_counter()
    layer, distances = _layer(model, tokenizer, instance, config)
    locate_s = time.perf_counter() - started
    weight = placement.stored(model, mlp_out_name(model, layer))  # an offloaded layer's from accelerate's map
    device = placement.module_device(mlp_out_module(model, layer))
    history: list[Step] = []
    with frozen(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        passes = Passes(model, layer, config.compute_dtype)
        target = passes.sequence(encode_pair(tokenizer, instance.prompt, instance.safe, **config.encoding()))
        regularisers = terms.build(model, tokenizer, instance, layer, passes, as_out_in(passes.spec, weight.detach()),
                                   config)
        master_dtype = torch.float32 if config.master_dtype == "float32" else weight.dtype
        master = weight.detach().to(device=passes.device, dtype=master_dtype).clone().requires_grad_(True)
        start = master.detach().clone()
        optimizer = torch.optim.Adam([master], lr=config.lr, weight_decay=config.weight_decay,
                                     fused=passes.device.type in ("cpu", "cuda"))  # one kernel, no temporaries
        for step in tqdm(range(config.steps), desc=f"dinm edit (layer {layer})",
                         disable=None if progress is None else not progress, leave=False):
            update = as_out_in(passes.spec, master - start)
            nll = passes.loss(target, update)
            if config.stop_nll is not None and nll.item() < config.stop_nll:
                history.append(Step(step, nll.item(), stopped=True))
                break  # the safe response is likely enough: no further change
            penalties = {term.name: term.penalty(update) for term in regularisers}
            loss = nll
            for term in regularisers:
                loss = loss + term.weight * penalties[term.name]
            history.append(Step(step, nll.item(), loss=loss.item(), **{k: v.item() for k, v in penalties.items()}))
            if not torch.isfinite(loss):
                raise EditError(f"edit diverged at step {step}: loss is {loss.item()}; the model is unchanged. "
                                f"Lower lr (now {config.lr})")
            (master.grad,) = torch.autograd.grad(loss, [master])
            optimizer.step()
    return _package(model, instance, config, layer, distances, weight, master, history,
                    {"locate": locate_s, "edit": time.perf_counter() - started - locate_s})


def _layer(model, tokenizer, instance: Instance, config: EditConfig) -> tuple[int, list[float]]:
    """The layer to edit (located, or `config.layer`) and the per-layer distances (none when given)."""
    if config.layer is not None:
        if config.layer >= num_layers(model):
            raise ConfigError(f"layer {config.layer} is out of range: the model has layers 0..{num_layers(model) - 1}")
        return config.layer, []
    located = locate(model, tokenizer, instance, config.distance, **config.encoding())
    return located.layer, located.distances


def _package(model, instance: Instance, config: EditConfig, layer: int, distances: list[float],
             weight: torch.Tensor, master: torch.Tensor, history: list[Step], seconds: dict) -> Delta:
    """The `Delta` of the trained `master` against the stored `weight`, with what the edit did in its metadata."""
    name = mlp_out_name(model, layer)
    steps_run = sum(not s.stopped for s in history)
    edited = master.detach().to(weight.dtype) if steps_run else weight.detach().clone()  # no step: no change
    if not torch.isfinite(edited).all():  # (a NaN update makes the next step's loss NaN: checked there)
        raise EditError(f"edit diverged by step {steps_run - 1}: the weights hold NaN/inf; the model is unchanged. "
                        f"Lower lr (now {config.lr})")
    logger.info("edited %s in %.2fs (locate %.2fs): nll %.3f -> %.3f", name, seconds["edit"], seconds["locate"],
                history[0].nll, history[-1].nll)
    return Delta.from_weights({name: (weight, edited)}, {
        "base_model": str(getattr(model.config, "_name_or_path", "") or ""),
        "base_revision": str(getattr(model.config, "_commit_hash", "") or ""),
        "model_type": model.config.model_type,
        "layer": str(layer),
        "distance": config.distance if config.layer is None else "none (layer given)",
        "distances": distances,
        "config": config.to_json(),
        "history": [s.to_dict() for s in history],
        "steps_run": str(steps_run),
        "instance_id": instance.id,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    })
