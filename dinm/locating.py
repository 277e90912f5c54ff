"""Step 1 of DINM: find the toxic layer, the one whose hidden states differ most between the safe and the
unsafe response."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import ops, placement
from .arch import accepts_logits_to_keep, decoder_layers
from .config import DISTANCES, EditConfig, check_distance
from .instance import Instance
from .text import encode_pair, pad_batch, pad_id
from .trace import record_outputs

@dataclass(frozen=True)
class LocateResult:
    """The chosen layer and the distance of every layer (index i = output of decoder layer i)."""

    layer: int
    distances: list[float]
    distance: str

    def to_dict(self) -> dict:
        return asdict(self)

    def chart(self) -> str:
        return distance_chart(self.distances, self.layer)


def distance_chart(distances: list[float], layer: int) -> str:
    """The per-layer distances as a bar chart for the terminal, one line per layer, the chosen one marked."""
    if not distances:
        return ""
    top = max(distances) or 1.0
    return "\n".join(f"  {i:>3} {'#' * max(1, round(30 * d / top)):<30} {d:.4g}{'  <- layer' if i == layer else ''}"
                     for i, d in enumerate(distances))


def _encode(tokenizer, instance: Instance, mode: str, chat_template: bool, max_prompt: int, max_response: int):
    """(ids, attention_mask, mask_a, mask_b) for the safe (a) and unsafe (b) response."""
    if mode == "paper":
        seqs = [list(tokenizer(t)["input_ids"])[:max_response] for t in (instance.safe, instance.unsafe)]
        ids, attn = pad_batch(seqs, pad_id(tokenizer), "right")
        everything = torch.ones(1, ids.shape[1], dtype=torch.bool)
        return ids, attn, everything, everything
    encs = [encode_pair(tokenizer, instance.prompt, r, chat_template=chat_template, max_prompt_tokens=max_prompt,
                        max_response_tokens=max_response, add_end=False) for r in (instance.safe, instance.unsafe)]
    ids, attn = pad_batch([e.ids for e in encs], pad_id(tokenizer), "right")
    masks = torch.zeros(2, ids.shape[1], dtype=torch.bool)
    for row, e in enumerate(encs):
        masks[row, e.n_prompt:len(e.ids)] = True
    # Position 0 holds the attention-sink activations (orders of magnitude larger than the rest and
    # carrying no content); it is never part of a response here, and never counted.
    masks[:, 0] = False
    return ids, attn, masks[0:1], masks[1:2]


@torch.no_grad()
def locate(
    model,
    tokenizer,
    instance: Instance | list[Instance],
    distance: str | None = None,
    *,
    chat_template: bool = True,
    max_prompt_tokens: int = 1024,
    max_response_tokens: int = 256,
) -> LocateResult:
    """Locate the toxic layer of `model` for one instance (never cached: each instance gets its own), or for a list
    of instances edited together (the layer of largest mean distance).

    Args:
        model: a causal LM whose `model_type` is in `dinm.arch.ARCHITECTURES`.
        tokenizer: its tokenizer.
        instance: the edit request, or a list of them.
        distance: None (the default edit's, `EditConfig().distance`), "cosine" (1 - cosine of the mean
            response states, scale-free across depth), "cosine_inner" (the same, choosing neither the first nor
            the last layer), "l2" (L2 of the mean states), "l2_tokens" (position-wise L2 over real response
            tokens) or "paper" (EasyEdit's unmasked rule). See `dinm.config.DISTANCES`.

    Returns:
        A `LocateResult` with the layer of largest distance (among those the rule allows) and the distances of
        all layers.

    Example:
        >>> result = dinm.locate(model, tokenizer, dinm.load_instance("data/example.json"))
        >>> result.layer, len(result.distances)
    """
    if distance is None:
        distance = EditConfig().distance
    check_distance(distance)
    kind, mode, allowed = DISTANCES[distance]
    batch = [instance] if isinstance(instance, Instance) else list(instance)
    encoding = dict(chat_template=chat_template, max_prompt=max_prompt_tokens, max_response=max_response_tokens)
    dist = sum(_distances(model, tokenizer, inst, kind, mode, **encoding) for inst in batch) / len(batch)
    n = len(dist)
    first, last = (1, n - 2) if allowed == "inner" and n > 2 else (0, n - 1)
    layer = first + int(dist[first:last + 1].argmax())
    return LocateResult(layer=layer, distances=[float(d) for d in dist], distance=distance)


def _distances(model, tokenizer, instance: Instance, kind: str, mode: str, **encoding) -> torch.Tensor:
    """The distance of each layer's states between the instance's safe and unsafe response, (layers,)."""
    ids, attn, mask_a, mask_b = _encode(tokenizer, instance, mode, **encoding)
    device = placement.module_device(model.get_input_embeddings())
    # Only hidden states are needed: skip the LM head where the model allows (most of a small model's cost).
    skip_head = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    with record_outputs(list(decoder_layers(model))) as outputs:
        model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False, **skip_head)
    hidden = [o.to(device) for o in outputs]  # per layer (2, tokens, hidden), not stacked: no copy
    return ops.layer_distances(hidden, mask_a.to(device), mask_b.to(device), kind)[:, 0]
