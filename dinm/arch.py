"""Where DINM finds its modules in each supported architecture.

Differences between architectures live in this table, not in `if` chains (cf. PEFT's
`utils/constants.py`). Every name is a dotted path from the `*ForCausalLM` model object.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Module names for one `model_type`.

    Attributes:
        layers: the `nn.ModuleList` of decoder layers.
        mlp_out: template of layer i's MLP output projection (the matrix DINM edits).
        mlp_up: template of layer i's MLP input projection (the one whose output is multiplied by the gate's
            activation in a gated MLP), or None where the architecture fuses it with the gate (Phi-3).
        mlp_gate: template of layer i's MLP gate projection, or None where the MLP has no gate (GPT-2, GPT-NeoX)
            or fuses it (Phi-3).
        final_norm: the norm applied after the last layer.
        lm_head: the output embedding (`lm_head_name` finds it under another transformers version's name).
        conv1d: True when `mlp_out` is a GPT-2 style `Conv1D`, whose weight is stored (in, out).
    """

    layers: str
    mlp_out: str
    final_norm: str
    lm_head: str
    conv1d: bool = False
    mlp_up: str | None = None
    mlp_gate: str | None = None


_LLAMA = ArchSpec("model.layers", "model.layers.{}.mlp.down_proj", "model.norm", "lm_head",
                  mlp_up="model.layers.{}.mlp.up_proj", mlp_gate="model.layers.{}.mlp.gate_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "phi3": ArchSpec("model.layers", "model.layers.{}.mlp.down_proj", "model.norm", "lm_head"),  # fused gate_up_proj
    "olmo": _LLAMA,
    "gpt2": ArchSpec("transformer.h", "transformer.h.{}.mlp.c_proj", "transformer.ln_f", "lm_head", conv1d=True,
                     mlp_up="transformer.h.{}.mlp.c_fc"),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.final_layer_norm", "lm_head",
        mlp_up="gpt_neox.layers.{}.mlp.dense_h_to_4h",
    ),
}


def arch_spec(model_or_type: nn.Module | str) -> ArchSpec:
    """The `ArchSpec` of a model (or a `model_type` string); one-line error for an unknown one."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        model_type = getattr(getattr(model_or_type, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    close = difflib.get_close_matches(str(model_type), ARCHITECTURES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ArchitectureError(
        f"model_type {model_type!r} is not supported by dinm (supported: {', '.join(sorted(ARCHITECTURES))}).{hint}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    return model.get_submodule(arch_spec(model).layers)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def mlp_out_name(model: nn.Module, layer: int) -> str:
    """Full parameter name of layer `layer`'s MLP output weight (the key a delta stores)."""
    n = num_layers(model)
    if not 0 <= layer < n:
        raise ArchitectureError(f"layer {layer} is out of range: the model has layers 0..{n - 1}")
    return arch_spec(model).mlp_out.format(layer) + ".weight"


def mlp_out_module(model: nn.Module, layer: int) -> nn.Module:
    """The module (an nn.Linear, or GPT-2's Conv1D) that owns `mlp_out_name(model, layer)`."""
    return model.get_submodule(mlp_out_name(model, layer).rpartition(".")[0])


def matrix_name(model: nn.Module, layer: int, matrix: str = "down") -> str:
    """Full parameter name of layer `layer`'s MLP matrix `matrix` ("down": the output projection, DINM's; "gate",
    "up": the input projections); a one-line error where the architecture has no such separate matrix."""
    if matrix == "down":
        return mlp_out_name(model, layer)
    spec = arch_spec(model)
    template = {"gate": spec.mlp_gate, "up": spec.mlp_up}.get(matrix)
    if template is None:
        have = [m for m, t in (("down", spec.mlp_out), ("gate", spec.mlp_gate), ("up", spec.mlp_up)) if t]
        raise ArchitectureError(f"matrix {matrix!r}: a {model.config.model_type} MLP has no separate {matrix} "
                                f"matrix; use one of {have}")
    mlp_out_name(model, layer)  # (the range check)
    return template.format(layer) + ".weight"


def matrix_module(model: nn.Module, layer: int, matrix: str = "down") -> nn.Module:
    """The module (an nn.Linear, or GPT-2's Conv1D) that owns `matrix_name(model, layer, matrix)`."""
    return model.get_submodule(matrix_name(model, layer, matrix).rpartition(".")[0])


def mlp_name(model: nn.Module, layer: int) -> str:
    """Module name of layer `layer`'s whole MLP block: the module holding its output projection."""
    return mlp_out_name(model, layer).rsplit(".", 2)[0]


def mlp_module(model: nn.Module, layer: int) -> nn.Module:
    """Layer `layer`'s whole MLP block (`mlp_name`)."""
    return model.get_submodule(mlp_name(model, layer))


def as_out_in(spec: ArchSpec, weight: torch.Tensor) -> torch.Tensor:
    """View an MLP output weight as (out_features, in_features), whatever its storage layout.

    GPT-2's `Conv1D` stores (in, out); this is the one place that knows it.
    """
    return weight.t() if spec.conv1d else weight


def lm_head_name(model: nn.Module) -> str:
    """The LM head's module name: the table's, else the output embedding's own (transformers 4 named GPT-NeoX's
    `embed_out`)."""
    name = arch_spec(model).lm_head
    try:
        model.get_submodule(name)
        return name
    except AttributeError:
        head = model.get_output_embeddings()
        return next(n for n, m in model.named_modules() if m is head)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can compute logits at chosen positions only (`logits_to_keep`)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters
