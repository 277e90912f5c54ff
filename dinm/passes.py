"""The forward passes of an edit: the model run on one sequence with an update added to the edited matrix.

The model is never written to: the update enters each pass as a separate term, `x @ D.T` added to the edited
module's output (`dinm.trace.adding`), so the model stays bit-identical whatever happens (divergence, an
interrupt), and a bf16 model does not round small updates away. What makes a pass cheap lives here too: the frozen
layers below the edited one run once per sequence and are replayed, logits are computed only where a loss reads
them, the LM head is fused with the loss (`dinm.losses.Head`), and with `compute_dtype="bfloat16"` the passes run
under autocast with bf16 copies of the matrices that run at every step.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import placement
from .arch import accepts_logits_to_keep, arch_spec, decoder_layers, lm_head_name, matrix_module, matrix_name
from .losses import Head, Unedited, kl_to
from .text import Encoded
from .trace import adding, passthrough, record_outputs, replay_outputs
from .unit import Unit, adding_unit


@contextlib.contextmanager
def frozen(model):
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


class Sequence:
    """One prompt + response, ready for repeated passes: the ids, the positions whose logits predict the response,
    and the recorded outputs of the frozen layers below the edited one (after its first pass)."""

    def __init__(self, encoded: Encoded, device: torch.device, labels_device: torch.device, keep_logits: bool,
                 precise: bool = False):
        self.precise = precise  # passes in the model's dtype even when the others run in bf16 (`Passes.sequence`)
        self.ids = torch.tensor([encoded.ids], device=device)  # (1, tokens)
        # logits at position t predict token t + 1
        self.positions = torch.arange(encoded.n_prompt - 1, len(encoded.ids) - 1, device=device)
        self.labels = self.ids[0, self.positions + 1].to(labels_device)
        self.below: list = []
        self.kwargs = dict(input_ids=self.ids, use_cache=False,
                           **({"logits_to_keep": self.positions} if keep_logits else {}))


class Passes:
    """Runs `model` with an update of one of layer `layer`'s MLP matrices added; see the module's text.

    Args:
        model: the model (frozen: see `frozen`).
        layer: the edited layer.
        compute_dtype: `EditConfig.compute_dtype` ("auto" is resolved here: `native_bf16`; `compute` says what).
        matrix: which matrix of the layer's MLP the update is added to (`EditConfig.matrix`).
        unit: for `matrix="unit"`, the repurposed unit (`dinm.unit.Unit`); the update is its three vectors' changes.
    """

    def __init__(self, model, layer: int, compute_dtype: str, matrix: str = "down", unit: Unit | None = None):
        self.model = model
        self.spec = arch_spec(model)
        self.unit = unit  # matrix="unit": the update is the repurposed unit's, added around the whole MLP block
        self.module = unit.mlp if unit is not None else matrix_module(model, layer, matrix)
        self.device = placement.module_device(self.module)
        self.below = list(decoder_layers(model))[:layer]
        # compute_dtype="bfloat16" on a model in another dtype: the passes run under autocast, the matrices that
        # run at every step as bf16 copies made once; the master, the loss and the update keep their dtype.
        stored = placement.stored(model, matrix_name(model, layer, "down" if unit is not None else matrix)).dtype
        native = native_bf16(self.device)
        why = (f"{'auto:' if compute_dtype == 'auto' else 'asked;'} {'native' if native else 'no native'} bf16 on "
               f"{device_capability(self.device)}")
        if compute_dtype == "auto":
            compute_dtype = "bfloat16" if stored == torch.float32 and native else "model"
        self.low = compute_dtype == "bfloat16" and stored != torch.bfloat16
        # what the delta's metadata says: the dtype the passes ran in, and why
        model_dtype = str(stored).replace("torch.", "")
        self.compute = (f"bfloat16, the benign KL pass {model_dtype} ({why})" if self.low else f"{model_dtype} ({why})")
        self.override = _low_precision_copies(model, layer, torch.bfloat16) if self.low else {}
        self.head = _fused_head(model, self.override, torch.bfloat16 if self.low else None)
        self.precise_head = _fused_head(model, {}, None) if self.low else self.head
        # Logits only where the loss reads them, when the model can (`logits_to_keep`): the LM head over a
        # 49k vocabulary at every prompt position is most of a small model's cost.
        self.keep_logits = accepts_logits_to_keep(model)

    def sequence(self, encoded: Encoded, precise: bool = False) -> Sequence:
        """`encoded` ready for passes; `precise`: they run in the model's dtype even when the others run in bf16.
        A KL term needs that: it keeps distributions within ~1e-5 of the unedited ones, and bf16 rounds logits by
        ~1e-2, so in bf16 it would see rounding, not the edit (measured: the record's benign reply kept in 50% of
        16 records with a bf16 KL pass, against 100% in fp32)."""
        labels_device = self.head.weight.device if self.head is not None else self.device
        return Sequence(encoded, self.device, labels_device, self.keep_logits, precise)

    def _low(self, seq: Sequence) -> bool:
        """Whether passes over `seq` run in bf16 (autocast, the bf16 copies and head): the passes do and `seq` is not
        a precise one."""
        return self.low and not seq.precise

    def computing(self, seq: Sequence):
        """The autocast context of a pass over `seq` (a no-op unless `_low(seq)`)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._low(seq))

    def _head(self, seq: Sequence) -> Head | None:
        return self.head if self._low(seq) else self.precise_head

    @torch.no_grad()
    def unedited(self, seq: Sequence) -> Unedited:
        """The unedited model's distributions over `seq`'s response positions, from one pass that also records
        the outputs of the layers below the edited one (which cannot change) for the later passes."""
        with record_outputs(self.below, whole=True) as outputs, self.computing(seq):
            out = self._outputs(seq, lambda: self.model(**seq.kwargs))
            seq.below = outputs
            head = self._head(seq)
            return Unedited(out if head is None else head.logits(out))

    def loss(self, seq: Sequence, update: torch.Tensor, target: Unedited | None = None) -> torch.Tensor:
        """With `update` ((out, in), any dtype) added to the edited matrix: the mean NLL of `seq`'s response, or
        KL(target || model) over its positions. The first pass over `seq` records the outputs of the layers
        below the edited one; later passes replay them."""
        first = self.below and not seq.below
        override = self.override if self._low(seq) else {}
        with (record_outputs(self.below, whole=True) if first else replay_outputs(self.below, seq.below)) as recorded, \
                self._adding(update), self.computing(seq):
            out = self._outputs(seq, lambda: functional_call(self.model, override, args=(), kwargs=seq.kwargs,
                                                             tie_weights=False))
            if first:
                seq.below = recorded
            want = seq.labels if target is None else target
            head = self._head(seq)
            if head is not None:
                return head.loss(out, want)
            return F.cross_entropy(out.float(), want) if target is None else kl_to(out, target)

    def _adding(self, update: torch.Tensor):
        return adding_unit(self.unit, update) if self.unit is not None else adding(self.module, update)

    def _outputs(self, seq: Sequence, call) -> torch.Tensor:
        """(response tokens, vocab) logits, or (response tokens, hidden) final states with a fused head."""
        fused = self._head(seq) is not None
        with passthrough(self.model.get_output_embeddings()) if fused else contextlib.nullcontext():
            out = call().logits
        return out[0] if "logits_to_keep" in seq.kwargs else out[0, seq.positions]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA GPU of compute capability 8.0 or later, a CPU
    with AVX512-BF16 or AMX (as torch's CPU build detects them). Elsewhere bf16 products are emulated, many times
    slower than fp32 (measured: 388.8 s against 15.7 s for one edit on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def device_capability(device: torch.device) -> str:
    """A short name of what `device` is, for the delta's metadata: "cpu AVX2", "cuda sm_90"."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda sm_{major}{minor}"
    if device.type == "cpu":
        return f"cpu {torch.backends.cpu.get_cpu_capability()}"
    return device.type


def _fused_head(model, override: dict, dtype: torch.dtype | None) -> Head | None:
    """A `Head` on the model's LM head, or None where the head is not a plain Linear whose output is the logits (a
    final soft-capping). Its weight is the bf16 copy in `override` if there is one, else the stored values (an
    offloaded head's, from accelerate's weights map), in `dtype` when given."""
    name = lm_head_name(model)
    head = model.get_submodule(name)
    if not isinstance(head, torch.nn.Linear) or getattr(model.config, "final_logit_softcapping", None) is not None:
        return None
    device = placement.module_device(head)
    weight = override.get(f"{name}.weight")
    if weight is None:
        weight = placement.stored(model, f"{name}.weight").to(device=device, dtype=dtype)
    bias = None if head.bias is None else placement.stored(model, f"{name}.bias").to(device)
    return Head(weight, bias)


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
