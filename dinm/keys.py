"""What the edited matrix reads on benign text: the second moment of its inputs ("keys", in ROME's words) over a
corpus of everyday conversations, for `EditConfig.preserve_weight`.

An update D of the matrix W changes the layer's output on an input k by D k. Over benign inputs the mean of
||D k||^2 is tr(D C D^T) with C = E[k k^T]: a penalty on that keeps the edit away from everything the model does
on ordinary requests at the cost of one small matrix product per step, where a KL term pays a forward and
backward pass per benign sequence and sees only the sequences it is given (cf. ROME's and MEMIT's covariance
statistics, and AlphaEdit's null-space projection from the same statistics).

An edit of the MLP's input side (`EditConfig.matrix` "gate" or "up") acts through the MLP's nonlinearity, so no
second moment gives its effect; `mlp_inputs` keeps the MLP block's inputs at a fixed sample of the corpus's tokens
instead, on which `dinm.terms.OutputPenalty` runs the block at each step.

The corpus (`dinm/benign_corpus.json`) was written for dinm: 120 everyday requests (none in `data/benign.json`,
the held-out list evaluations measure retention on), each with the embedded model's greedy 64-token reply, so the
statistic covers assistant text as well as prompts. Conversations are formatted with the edited model's own chat
template.

Either statistic is kept in memory for the next edit in the process and, unless `DINM_CACHE=off`, on disk for the
next process (`dinm edit` runs one per call): a `.safetensors` file per model, layer and token sequence under
`$DINM_CACHE`, else `$XDG_CACHE_HOME/dinm`, else `~/.cache/dinm`. Its name is a hash of everything the
statistic depends on (the corpus's token ids, the sums of the weights below the matrix, the layer, the dtype and,
for a sample, its kind and size),
so a changed model or tokenizer misses rather than reads a stale file; an unreadable file is computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache

import torch
from torch import nn

from . import cache, placement
from .arch import decoder_layers, mlp_module, mlp_name, mlp_out_module, mlp_out_name
from .text import encode_pair, pad_batch, pad_id
from .trace import input_of

logger = logging.getLogger(__name__)

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benign_corpus.json")
_CACHE: dict = {}  # (model, layer, encoding, kind, sample) -> (weight sums, statistic): the last few edits' layers
_CACHE_SIZE = 4


@lru_cache(maxsize=1)
def benign_corpus() -> tuple[tuple[str, str], ...]:
    """The (prompt, reply) pairs of `dinm/benign_corpus.json`."""
    with open(CORPUS, encoding="utf-8") as f:
        return tuple((item["prompt"], item["reply"]) for item in json.load(f))


def _cache_file(model, seqs: list, sums: tuple, layer: int, dtype: torch.dtype, kind: str = "keys",
                detail: object = None) -> str | None:
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    what = [seqs, sums, layer, str(dtype), config] + ([kind, detail] if kind != "keys" else [])  # (keys: 0.2's name)
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return cache.path_for(f"{kind}-{digest}.safetensors")


def _weight_sums(model, layer: int, skip: nn.Module | None = None) -> tuple:
    """The sum of each weight the edited matrix's input depends on: the embeddings (the input embeddings and every
    weight registered before the first decoder layer: GPT-2's position embeddings too) and the decoder layers up to
    `layer` (they change when another delta is applied there), except those of `skip` (default: `layer`'s MLP
    output matrix), which do not change those inputs. An offloaded weight (accelerate's, on "meta") is read where
    its hook loads it from, so a delta
    applied in place to a CPU-offloaded layer, or a changed checkpoint loaded with disk offload, misses the cache
    like any other change (reading a disk-offloaded layer costs what one forward loads). Cheap, and equal only for
    equal weights in practice; a stale statistic would only weaken a regulariser, never change a result silently
    beyond that. Summed in float32 (a float64 sum converted every weight first: 1.7 s an edit for SmolLM2-135M on
    a 2-core CPU, where this takes milliseconds; an offloaded part is read once, less than one forward loads), one
    weight at a time: a disk-offloaded weight is a fresh copy at each read, freed after its sum."""
    layers = list(decoder_layers(model))
    blocks = [model.get_input_embeddings(), *layers[:layer + 1]]
    inside = {id(p) for block in blocks for p in block.parameters()}
    first = {id(p) for p in layers[0].parameters()}
    for _, p in model.named_parameters():  # (in registration order: embeddings, then the layers, then the head)
        if id(p) in first:
            break
        inside.add(id(p))
    skipped = {id(p) for p in (skip if skip is not None else mlp_out_module(model, layer)).parameters()}
    return weight_sums(placement.stored(model, name) for name, p in model.named_parameters()
                       if id(p) in inside and id(p) not in skipped)


def weight_sums(tensors) -> tuple:
    """The float32 sum of each of `tensors` (any iterable: a generator keeps one at a time), as a tuple of floats.
    The sums are all queued on their devices before any is copied to the host."""
    values = [t.detach().sum(dtype=torch.float32) for t in tensors]
    return tuple(torch.stack([v.cpu() for v in values]).tolist()) if values else ()


def hooked(model, reading: nn.Module | None = None) -> bool:
    """Whether `model` has forward hooks (a patch's earlier units added while the next trains; also global ones,
    `torch.nn.modules.module.register_module_forward_hook`): its outputs are not those of its weights, so nothing
    computed from them may be kept under a key of its weights. With `reading`, a module inside one decoder layer whose
    inputs are what is computed, only hooks that can change those inputs count: every pre-hook, and every forward
    hook but those of later layers, of `reading` and what it holds, and of the modules that hold it (each of these
    runs after its inputs are read). A patch's unit at the same or a later layer leaves the cache in use."""
    from torch.nn.modules import module as torch_module

    if getattr(torch_module, "_global_forward_hooks", None) or getattr(torch_module, "_global_forward_pre_hooks", None):
        return True
    after: set[int] = set()  # (modules whose forward hooks run after `reading` reads its inputs)
    if reading is not None:
        layers = list(decoder_layers(model))
        at = next((i for i, layer in enumerate(layers) if any(m is reading for m in layer.modules())), None)
        if at is not None:
            # (a module that a later layer shares with an earlier one, or with this one, runs before too)
            before = {id(m) for layer in layers[:at + 1] for m in layer.modules()}
            after = {id(m) for layer in layers[at + 1:] for m in layer.modules()} - before
            after |= {id(m) for m in reading.modules()}
            after |= {id(m) for m in model.modules() if any(n is reading for n in m.modules())}
    return any(m._forward_pre_hooks or (m._forward_hooks and id(m) not in after) for m in model.modules())


def _corpus_ids(tokenizer, chat_template: bool, max_response_tokens: int) -> list[list[int]]:
    seqs = [encode_pair(tokenizer, p, r, chat_template=chat_template, max_response_tokens=max_response_tokens).ids
            for p, r in benign_corpus()]
    return sorted(seqs, key=len)  # batches of similar length pad little


def _kept(model, tokenizer, layer: int, kind: str, name: str, chat_template: bool, max_response_tokens: int,
          compute, detail: object = None) -> torch.Tensor:
    """A statistic of the inputs of module `name` over the benign corpus (`kind`: "keys", the second moment; "inputs", a
    sample of `detail` tokens), from memory, else from the disk cache, else `compute(seqs)` and kept in both (see
    the module's text). A `hooked` model's (hooks that change the module's inputs) is computed every time and kept
    nowhere."""
    module = model.get_submodule(name)
    if hooked(model, module):
        return compute(_corpus_ids(tokenizer, chat_template, max_response_tokens))
    key = (id(model), layer, chat_template, max_response_tokens, kind, detail)
    sums = _weight_sums(model, layer, module)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == sums:
        return hit[1]
    seqs = _corpus_ids(tokenizer, chat_template, max_response_tokens)
    dtype = next((placement.stored(model, f"{name}.{leaf}").dtype for leaf, _ in module.named_parameters()),
                 torch.float32)
    path = _cache_file(model, seqs, sums, layer, dtype, kind, detail)
    what = "key statistic" if kind == "keys" else "benign input sample"
    tensor = "moment" if kind == "keys" else kind  # (the key statistic's files keep dinm 0.2's tensor name)
    stored = cache.read(path, (tensor,), what)
    value = None if stored is None else stored[tensor]
    if value is not None:
        value = value.to(placement.module_device(module))
        logger.info("%s of %s read from %s", what, name, path)
    else:
        value = compute(seqs)
        cache.write(path, {tensor: value}, {"layer": str(layer), "module": name,
                                          "model_type": str(model.config.model_type)}, what)
        logger.info("%s of %s: %d benign sequences", what, name, len(seqs))
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (sums, value)
    return value


@torch.no_grad()
def key_moment(model, tokenizer, layer: int, *, chat_template: bool = True, batch_size: int = 8,
               max_response_tokens: int = 64) -> torch.Tensor:
    """E[k k^T] (in, in), float32, over the tokens of the benign corpus, of the inputs of `layer`'s MLP output
    matrix; runs the model only up to that matrix, in the model's dtype whatever autocast the caller runs under,
    and keeps the result for the same model, layer and weights (in memory, and on disk: see the module's text)."""
    name = mlp_out_name(model, layer).rpartition(".")[0]
    return _kept(model, tokenizer, layer, "keys", name, chat_template, max_response_tokens,
                 lambda seqs: _compute(model, tokenizer, model.get_submodule(name), seqs, batch_size))


SAMPLE = 2048  # benign-corpus tokens `mlp_inputs` keeps (of ~12,000 for SmolLM2's tokenizer)


@torch.no_grad()
def mlp_inputs(model, tokenizer, layer: int, *, chat_template: bool = True, batch_size: int = 8,
               max_response_tokens: int = 64, sample: int | None = SAMPLE) -> torch.Tensor:
    """The inputs (tokens, hidden), float32, of `layer`'s MLP block at `sample` tokens of the benign corpus drawn
    uniformly without replacement (a fixed draw: the same tokens for every edit), or at every token (`sample=None`),
    for the penalty on an edit of the MLP's input side (`dinm.terms.OutputPenalty`) and a unit edit's negatives
    (`dinm.unit`). Kept like `key_moment`'s statistic; the MLP's own weights do not change its inputs, so a delta of
    that layer's MLP keeps it."""
    mlp = mlp_module(model, layer)

    def compute(seqs):
        total = sum(len(s) for s in seqs)
        chosen = torch.arange(total) if sample is None else \
            torch.randperm(total, generator=torch.Generator().manual_seed(0))[:sample].sort().values
        rows, start = [], 0
        for x in _inputs(model, tokenizer, mlp, seqs, batch_size):
            picked = chosen[(chosen >= start) & (chosen < start + len(x))] - start
            rows.append(x[picked.to(x.device)].float())
            start += len(x)
        return torch.cat(rows)

    return _kept(model, tokenizer, layer, "inputs", mlp_name(model, layer), chat_template, max_response_tokens,
                 compute, sample)


def _compute(model, tokenizer, module, seqs: list, batch_size: int) -> torch.Tensor:
    """E[k k^T] of `module`'s inputs over the real tokens of `seqs`, running the model only up to `module`."""
    total, count = None, 0
    for k in _inputs(model, tokenizer, module, seqs, batch_size):
        k = k.double()
        total = k.T @ k if total is None else total + k.T @ k
        count += k.shape[0]
    return (total / count).float()


def _inputs(model, tokenizer, module, seqs: list, batch_size: int):
    """`module`'s inputs at the real tokens of `seqs` (tokens, in), a batch at a time, in the order of `seqs`,
    running the model only up to `module` in the model's own dtype."""
    device = placement.module_device(model.get_input_embeddings())
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[start:start + batch_size], pad_id(tokenizer), "right")
            # The statistic is the model's own, cached for any caller: not that of a caller's autocast dtype.
            with torch.autocast(device.type, enabled=False):
                k = input_of(module, lambda: model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                                   use_cache=False))
            # real tokens only (the mask goes where the inputs were captured: an offloaded module's own weights are
            # on "meta", which indexes nothing)
            yield k.reshape(-1, k.shape[-1])[mask.bool().to(k.device).reshape(-1)]
    finally:
        model.train(was_training)
