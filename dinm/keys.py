"""What the edited matrix reads on benign text: the second moment of its inputs ("keys", in ROME's words) over a
corpus of everyday conversations, for `EditConfig.preserve_weight`.

An update D of the matrix W changes the layer's output on an input k by D k. Over benign inputs the mean of
||D k||^2 is tr(D C D^T) with C = E[k k^T]: a penalty on that keeps the edit away from everything the model does
on ordinary requests at the cost of one small matrix product per step, where a KL term pays a forward and
backward pass per benign sequence and sees only the sequences it is given (cf. ROME's and MEMIT's covariance
statistics, and AlphaEdit's null-space projection from the same statistics).

The corpus (`dinm/benign_corpus.json`) was written for dinm: 120 everyday requests (none in `data/benign.json`,
the held-out list evaluations measure retention on, nor in `dinm.anchors`), each with the embedded model's
greedy 64-token reply, so the statistic covers assistant text as well as prompts. Conversations are formatted
with the edited model's own chat template.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache

import torch

from . import placement
from .arch import decoder_layers, mlp_out_name
from .text import encode_pair, pad_batch, pad_id

logger = logging.getLogger(__name__)

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benign_corpus.json")
_CACHE: dict = {}  # (model, layer, chat_template) -> (fingerprint, statistic); the last few edits' layers
_CACHE_SIZE = 4


@lru_cache(maxsize=1)
def benign_corpus() -> tuple[tuple[str, str], ...]:
    """The (prompt, reply) pairs of `dinm/benign_corpus.json`."""
    with open(CORPUS, encoding="utf-8") as f:
        return tuple((item["prompt"], item["reply"]) for item in json.load(f))


class _Stop(Exception):
    """Raised by the hook once the edited matrix's input is read: the layers above need not run."""


def _fingerprint(model, layer: int) -> tuple:
    """Changes when any weight the edited matrix's input depends on changes: the embeddings and the decoder layers
    up to `layer` (e.g. after another delta was applied there), the matrix itself excepted, since it does not
    change its own inputs. Sums in float64: cheap, and equal only for equal weights in practice; a stale statistic
    would only weaken a regulariser, never change a result silently beyond that."""
    params = list(model.get_input_embeddings().parameters())
    for block in list(decoder_layers(model))[:layer + 1]:
        params += list(block.parameters())
    own = model.get_parameter(mlp_out_name(model, layer))
    values = [p.detach().double().sum() for p in params if p.device.type != "meta" and p is not own]
    return tuple(torch.stack(values).tolist()) if values else ()


@torch.no_grad()
def key_moment(model, tokenizer, layer: int, *, chat_template: bool = True, batch_size: int = 8,
               max_response_tokens: int = 64) -> torch.Tensor:
    """E[k k^T] (in, in), float32, over the tokens of the benign corpus, of the inputs of `layer`'s MLP output
    matrix; runs the model only up to that matrix, in the model's dtype whatever autocast the caller runs under,
    and keeps the result for the same model, layer and weights."""
    key = (id(model), layer, chat_template)
    fingerprint = _fingerprint(model, layer)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == fingerprint:
        return hit[1]
    name = mlp_out_name(model, layer)
    module = model.get_submodule(name.rsplit(".", 1)[0])
    seqs = [encode_pair(tokenizer, p, r, chat_template=chat_template, max_response_tokens=max_response_tokens).ids
            for p, r in benign_corpus()]
    seqs.sort(key=len)  # batches of similar length pad little
    device = placement.module_device(model.get_input_embeddings())
    total, count, real = None, 0, None

    def read(_module, args):
        nonlocal total, count
        k = args[0].detach()
        k = k.reshape(-1, k.shape[-1])[real.reshape(-1)].double()  # real tokens only
        total = k.T @ k if total is None else total + k.T @ k
        count += k.shape[0]
        raise _Stop

    handle = module.register_forward_pre_hook(read)
    was_training = model.training
    model.eval()
    module_at = placement.module_device(module)
    try:
        # The statistic is the model's own, cached for any caller: not that of a caller's autocast dtype.
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[start:start + batch_size], pad_id(tokenizer), "right")
            real = mask.bool().to(module_at)
            try:
                with torch.autocast(device.type, enabled=False):
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    moment = (total / count).float()
    logger.info("key statistic of %s: %d benign tokens", name, count)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (fingerprint, moment)
    return moment
