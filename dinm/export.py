"""Deltas as a PEFT LoRA adapter folder, for serving stacks that load edits as adapters.

`to_peft(deltas, folder)` writes ``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha`` = ``r`` so that
PEFT's scaling is 1, ``target_modules`` (the edited matrix's path within a layer, e.g. ``mlp.down_proj``,
with ``layers_to_transform``; the full module paths when the deltas edit more than one kind of matrix)) and
``adapter_model.safetensors`` with PEFT's tensor names (``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r)). A factored delta
(`EditConfig(rank=r)`) is exported exactly, and so is a masked one (k changed rows or columns: rank k, a one-hot
factor beside the stored rows or columns; a unit edit's three updates have rank 1); a dense one by its truncated SVD
(`dinm.lowrank.truncate`, at `rank` or at the rank holding `energy`), whose relative Frobenius error is returned. Deltas of different layers go into
one adapter; deltas of the same matrix add up (their factors are concatenated). Modules of lower rank are padded
with zero rows and columns to the adapter's one `r`, which every LoRA loader reads. Writing needs no `peft`;
`load_peft` (loading an adapter onto a model) needs the optional extra ``dinm[peft]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import torch
from safetensors.torch import save_file

from . import atomic
from .arch import ARCHITECTURES
from .delta import Delta
from .errors import ConfigError, DeltaError, DinmError
from .lowrank import truncate
from .version import __version__

PREFIX = "base_model.model."


@dataclasses.dataclass
class Exported:
    """What `to_peft` wrote for one delta tensor: its module, the rank it has in the adapter, and the relative
    Frobenius error of that rank against the delta's update (0.0: exact)."""

    module: str
    layer: int
    rank: int
    error: float
    exact: bool


def lora_factors(delta: Delta, name: str, rank: int | None = None, energy: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    """``(B, A, error, exact)``: LoRA factors ((out, r), (r, in), fp32, so that the update of the module's output
    is ``x @ A.T @ B.T``) of the update of parameter `name`: a factored delta's own factors, or a masked one's stored
    rows (columns) beside one-hot columns (rows) (both exact), unless a smaller `rank` (or an `energy`) is asked
    for; a dense one's truncated SVD."""
    conv1d = _conv1d(delta)
    factors = delta.factors(name) or _masked_factors(delta, name)
    if factors is not None and energy is None and (rank is None or rank >= factors[0].shape[1]):
        up, down = factors
        b, a = (down.t(), up.t()) if conv1d else (up, down)  # (Conv1D stores (in, out): D.T = down.T @ up.T)
        return b.contiguous(), a.contiguous(), 0.0, True
    if rank is None and energy is None:
        raise ConfigError(f"the update of {name!r} is dense: give a rank (--rank) or an energy (--energy) for its "
                          f"truncated SVD")
    d = delta.dense(name).float()
    t = truncate(d.t() if conv1d else d, rank=rank, energy=energy)
    return t.up, t.down, t.error, False


def _masked_factors(delta: Delta, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(up, down)`` (fp32, the parameter's layout) with ``up @ down`` the masked update of parameter `name`,
    exactly (each product element is one stored value times 1, plus zeros), or None when it is not masked."""
    form = delta.form(name)
    if form not in ("rows", "columns"):
        return None
    d, mask = delta.stored_update(name)
    where = mask.nonzero().reshape(-1)
    onehot = torch.zeros(len(where), mask.numel())
    onehot[torch.arange(len(where)), where] = 1.0
    return (onehot.t(), d.float()) if form == "rows" else (d.float(), onehot)


def to_peft(deltas: Sequence[Delta], folder: str | os.PathLike, *, rank: int | None = None,
            energy: float | None = None) -> list[Exported]:
    """Write `deltas` as one PEFT LoRA adapter in the new folder `folder` (whole or not at all).

    Args:
        deltas: one or more deltas of the same base model (`Delta.load`).
        folder: the adapter folder to create; it must not exist.
        rank: for dense updates (and factored ones of higher rank): keep this many singular values.
        energy: instead of `rank`, the smallest rank holding this share (0 < energy <= 1) of the squared singular
            values.

    Returns:
        What was written per delta tensor (rank, error). Refused, writing nothing, when the deltas are of different
        models or a dense one has neither `rank` nor `energy`.
    """
    deltas = list(deltas)
    if not deltas:
        raise ConfigError("no delta to export; give at least one")
    if rank is not None and energy is not None:
        raise ConfigError("give either a rank or an energy, not both")
    model_type, base = _same_model(deltas)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise DeltaError(f"delta for model_type {model_type!r}: dinm does not know its module names, so it cannot "
                         f"name the adapter's target modules")
    modules: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    layers, suffixes, report = set(), set(), []
    for delta in deltas:
        for name in delta.names:
            module, layer = _module(spec, name)
            suffixes.add(module.partition(f".{layer}.")[2])
            b, a, error, exact = lora_factors(delta, name, rank=rank, energy=energy)
            modules.setdefault(module, []).append((b, a))
            layers.add(layer)
            report.append(Exported(module, layer, b.shape[1], error, exact))
    tensors, r = {}, max(sum(b.shape[1] for b, _ in parts) for parts in modules.values())
    for module, parts in modules.items():
        b = torch.cat([b for b, _ in parts], dim=1)  # concatenated factors: the sum of the updates
        a = torch.cat([a for _, a in parts], dim=0)
        pad = r - b.shape[1]  # zero columns of B and rows of A add nothing
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).contiguous()
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).contiguous()
    # "mlp.down_proj": PEFT matches it as a suffix (GPT-2's "c_proj" alone would also match the attention's), in the
    # layers listed. Deltas of several matrices name each module whole, so that no layer gets a matrix it lacks.
    targets, transform = (sorted(suffixes), sorted(layers)) if len(suffixes) == 1 else (sorted(modules), None)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base or None, "revision": None,
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": spec.conv1d,
        "use_rslora": False,        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "target_modules": targets, "layers_to_transform": transform,
        "layers_pattern": spec.layers.rpartition(".")[2] if transform else None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    provenance = [{"layer": d.layer, "layers": d.layers, "instance_id": d.metadata.get("instance_id"),
                   "format": d.metadata["format"], "checksum": d.metadata.get("checksum")} for d in deltas]
    with atomic.new_folder(os.fspath(folder)) as tmp:
        with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={
            "format": "pt", "dinm_version": __version__, "dinm_deltas": json.dumps(provenance)})
    return report


def _same_model(deltas: list[Delta]) -> tuple[str, str]:
    kinds = {(d.metadata.get("model_type", ""), d.metadata.get("base_model", "")) for d in deltas}
    if len(kinds) > 1:
        raise ConfigError(f"the deltas are for different models ({sorted(kinds)}); one adapter serves one base model")
    model_type, base = kinds.pop()
    if not model_type:
        raise DeltaError("a delta has no 'model_type' metadata; export deltas made by dinm.edit")
    return model_type, base


def _module(spec, name: str) -> tuple[str, int]:
    """The module path of parameter `name` and its layer, checked against the architecture's MLP matrices an edit
    trains."""
    module, _, leaf = name.rpartition(".")
    templates = [t for t in (spec.mlp_out, spec.mlp_gate, spec.mlp_up) if t]
    for template in templates:
        prefix, _, rest = template.partition("{}")
        index = module[len(prefix):len(module) - len(rest)] if module.startswith(prefix) and module.endswith(rest) \
            else ""
        if leaf == "weight" and index.isdigit():
            return module, int(index)
    raise DeltaError(f"delta tensor {name!r} is not an MLP matrix an edit trains "
                     f"({', '.join(t.format('N') + '.weight' for t in templates)}); only those export as LoRA")


def _conv1d(delta: Delta) -> bool:
    spec = ARCHITECTURES.get(delta.metadata.get("model_type", ""))
    return bool(spec and spec.conv1d)


def load_peft(model, folder: str | os.PathLike):
    """`model` with the adapter in `folder` loaded by PEFT (`peft.PeftModel.from_pretrained`); needs the optional
    extra ``dinm[peft]``. PEFT injects the adapter's layers into `model` itself (`.unload()` takes them out)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise DinmError("loading a LoRA adapter needs the peft package: pip install 'dinm[peft]'") from None
    return PeftModel.from_pretrained(model, os.fspath(folder))


