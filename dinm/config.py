"""`EditConfig`: every knob of one DINM edit, frozen, with a JSON round-trip stored in each delta; and the catalogues
of choices its fields (and the CLI's options) take. Imports no torch: `dinm --help` reads the catalogues."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError

# Locate rules: name -> (distance kind, how the responses are encoded, which layers may be chosen).
#   kind: "cosine" (1 - cosine of the mean response states), "l2" (L2 of the means), "l2_tokens" (position-wise L2
#   over real response tokens); see `dinm.twin.layer_distances`.
#   "prompt": each response follows the chat-formatted adversarial prompt; only response tokens count.
#   "paper":  EasyEdit's rule, kept to reproduce it: the bare responses as one right-padded batch, every
#             position counted, padding and the first token included (which dominate it, see README).
#   "all": any layer; "inner": neither the first nor the last. The first layer's output is mostly the tokens'
#   embeddings, which differ wherever two texts do, and the last layer's is the next-token prediction, which
#   differs wherever they will; an edit there moves every reply (see README, "Choosing the default edit").
DISTANCES = {
    "cosine": ("cosine", "prompt", "all"),
    "cosine_inner": ("cosine", "prompt", "inner"),
    "l2": ("l2", "prompt", "all"),
    "l2_tokens": ("l2_tokens", "prompt", "all"),
    "paper": ("l2_tokens", "paper", "all"),
}
# dtypes a model can be loaded in (`dinm.load_model`, the CLI's --dtype)
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")
MASTER_DTYPES = ("float32", "model")
# The system-prompt suffix of the paper's code (EasyEdit appends it to the prompts it generates from after an edit).
PAPER_SUFFIX = "If the user's request is reasonable, give the correct answer. Please give the right response:"
COMPUTE_DTYPES = ("auto", "model", "bfloat16")
KL_TEXTS = ("answer", "self")
VARIANTS = ("none", "request", "wrapped", "request+wrapped")  # what the edit trains besides the adversarial prompt
TWO_UNITS = "request+wrapped"  # (`EditConfig.variants`): two units, one per variant set
PRECONDITIONS = ("none", "keys")  # the coordinates Adam moves a dense update in (`EditConfig.precondition`)
MATRICES = ("auto", "down", "gate", "up", "unit")  # what of the MLP an edit trains (`EditConfig.matrix`)
# The measured setting of each kind of edit: the values that `EditConfig.resolved` gives the fields left None.
# `EditConfig.unit()` (and `dinm edit --unit`) set the unit's fields explicitly: one unit, the request's.
UNIT_SETTING = dict(matrix="unit", variants="request", steps=40, lr=1e-2, unit_reply_on=0)
MATRIX_SETTING = dict(variants="none", steps=50, lr=2e-3, unit_reply_on=0)  # "down", "gate" and "up"
# What `matrix="auto"` gives one instance on a gated MLP (`EditConfig.two_units()`): two units, the request's then
# the wrappers', each fitted on over its trained replies' first 2 tokens; the rule's pick (README, "Choosing the
# default edit": with 3 tokens, the default of dinm 0.8, the written instance's refusals end in words run together).
AUTO_UNIT_SETTING = dict(UNIT_SETTING, variants=TWO_UNITS, unit_reply_on=2)
# Fields dinm 0.1 had, with the value that meant "off" (what every edit does now). They were removed in 0.2: no
# benchmark in RESULTS.md kept them (README, "Removed settings"); a config that still sets them "off" is read.
# `probe` (a unit's gate fitted on dinm's written wrappers too) lived in one commit of 0.2.0 (0953798), screened and
# reverted (RESULTS.md, "Screen: the unit's gate fitted on dinm's wrappers too"): its deltas say probe="trained".
REMOVED_FIELDS = {"cache": True, "rows": 1.0, "kl_prompts": [], "max_update": None, "protect": None,
                  "probe": "trained"}
REMOVED_IN = {"probe": ("0.3", "0.2.0 at commit 0953798")}  # (field: removed in, what to repeat it with); else 0.2


def check_positive_int(name: str, value) -> None:
    """A one-line `ConfigError` naming `name` unless `value` is an int >= 1 (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ConfigError(f"distance {distance!r} is not one of: {', '.join(DISTANCES)}")


@dataclass(frozen=True)
class EditConfig:
    """Settings of one edit.

    Attributes:
        layer: edit this layer instead of locating one (None: locate per instance).
        distance: the locate rule (see `DISTANCES`); the default, "cosine_inner", never picks the
            first or the last layer, where an edit moves every reply (README, "Choosing the default edit").
        steps: optimiser steps. None (the default): the measured setting of what `matrix` trains, 40 for a unit and
            50 for a matrix (`AUTO_UNIT_SETTING`, `UNIT_SETTING`, `MATRIX_SETTING`).
        lr: Adam learning rate. None (the default): 1e-2 for a unit (its three vectors start near zero), 2e-3 for
            a matrix (which starts at its stored values).
        kl_weight: weight of KL(unedited || edited) on the benign prompt's answer tokens; the KL has a
            gradient (in the paper's code it does not, so it constrains nothing).
        weight_decay: Adam weight decay (pulls the edited matrix toward zero, not toward the original: 0 by default).
        chat_template: format prompts with the tokenizer's chat template when it has one.
        max_prompt_tokens: longer prompts keep their last tokens.
        max_response_tokens: longer responses are cut.
        master_dtype: "float32" trains an fp32 copy of the edited matrix whatever the model's dtype;
            "model" trains in the model's dtype.
        compute_dtype: "model" runs the forward and backward passes in the model's dtype (load it in bf16 for bf16
            compute, in fp32 for fp32); "bfloat16" runs them in bf16 whatever the model's dtype (autocast, with bf16
            copies of the matrices above the edited layer made once per edit: about half their fp32 size in
            extra memory), which is faster where bf16 matrix products are (GPUs, CPUs with AMX). The master copy,
            the loss and the update keep `master_dtype`, and the edit enters the passes as a separate term
            `x @ D.T`, so no update is rounded away in a bf16 `W + D`. The benign KL's passes always run in the
            model's dtype: bf16 rounding of the logits is larger than the differences the KL keeps small.
            "auto" (the default) is "bfloat16" for an fp32 model on a device that multiplies bf16 in hardware (a
            CUDA GPU of compute capability 8.0 or later; a CPU with AVX512-BF16 or AMX) and "model" elsewhere:
            emulated bf16 is many times slower than fp32 (`dinm.passes.native_bf16`). The delta's metadata says
            what was chosen and why ("compute").
        seed: seeds torch's RNG inside the edit (the global RNG is left as it was).
        kl_text: what the KL term reads after the instance's benign prompt: "answer", the instance's benign
            answer (the paper), or "self", the unedited model's own greedy reply (generated once, before the first
            step), which is the reply a user sees and the edit should keep.
        kl_reply_tokens: length of the self reply (`kl_text="self"`).
        stop_nll: stop early once the safe response's mean NLL per token is below this (None: all `steps`).
        prompt_suffix: text appended (after a space) to the adversarial prompt for locate and the edit's NLL term,
            e.g. `PAPER_SUFFIX`; evaluation prompts are never changed by it. "": none.
        preserve_weight: weight of a penalty on what the update does to benign inputs of the edited matrix:
            mean ||D k||^2 over the tokens k of a corpus of everyday conversations (`dinm.keys`), relative to
            the layer's own mean ||W k||^2 there. Costs one forward of that corpus up to the edited layer per
            edit (kept for the next edit of the same layer) and a small matrix product per step. 0: none.
        rank: train the update as a product ``D = B @ A`` of rank `rank` (fp32 factors; B starts at zero, as in
            LoRA, and A at the input directions where the safe response's NLL falls fastest per unit of change on
            benign inputs: `dinm.editing._Factored`), with the same losses, and store it factored (`Delta.factors`),
            which `dinm export` turns into a LoRA adapter exactly. None: a dense update of the whole matrix.
        unsafe_weight: weight of a term that lowers the unsafe response's likelihood to the adversarial prompt, not
            only raises the safe one's: a hinge on the unsafe response's mean NLL per token, which pushes it up to
            `dinm.terms.UNSAFE_MARGIN` nats above the unedited model's value and no further (an unbounded term
            would reward any reply that is not that text, gibberish included). Costs one more forward and backward
            per step. 0: none.
        variants: None (the default): "request+wrapped" where `matrix="auto"` picks the unit edit, "request" for
            `matrix="unit"`, "none" for a matrix. "request": the edit also trains
            the safe response to the request alone, without its jailbreak wrapper, as dinm reads it from the
            adversarial prompt (`dinm.instance.request_of`: the prompt's last question, or its last sentence when it
            asks none, after its last colon), so that the bare harmful question is refused too. "wrapped": the
            request alone and the request inside each of dinm's written jailbreak wrappers
            (`dinm/wrapper_corpus.json`: a persona without rules, two voices, fiction, a maintenance mode, ...), so
            that other wrappers than the instance's are refused too; costs one more sequence per wrapper in every
            step. "request+wrapped" (a unit edit only): two units, one after another: the first trained as
            "request" (`EditConfig.unit()`'s edit), the second as "wrapped" on the model with the first added, so
            that the bare request and other wrappers are each some unit's own target (`dinm.editing._unit_patch`).
            Alone, the two added overshoot into looping refusals (README, "Two units, the request's and the
            wrappers'"); with `unit_reply_on=2` they are the default (`EditConfig.two_units()`).
            "none": the adversarial prompt only. The layer is located from the instance itself either way.
        precondition: "keys": Adam moves a dense update D in coordinates whitened by a second moment M of the
            edited matrix's inputs on text the edit must keep: the benign corpus's keys (`dinm.keys`) plus, ten times
            heavier, those of the KL term's sequences (`dinm.editing._preconditioner`). It trains Z = D L with
            M = L L^T, D = Z L^-1 (so ||Z||^2 = tr(D M D^T)): a step is even in every direction of that input space
            rather than of weight space, and does not spend itself where benign text lives (cf. K-FAC's input
            factor). The loss is the same; the path, and where `steps` steps end, are not. Costs one
            (out, in) x (in, in) product per pass.
            "none": Adam on D itself. Not with `rank`; the trained Z is fp32 (`master_dtype="float32"`).
        matrix: what of the located layer's MLP the edit trains. "auto" (the default): "unit" for one instance where
            the model's MLP is gated (Llama, Mistral, Qwen2, ...) and neither `rank` nor `precondition` is set, with
            the other fields left None as `EditConfig.two_units()` sets them (two units, each fitted on over its
            replies' first 2 tokens), else "down" (a batch too: one unit for many requests refused less on other
            records than one dense patch); the rule that chose the default picks two units on the embedded model
            (README, "Choosing the default edit").
            "down": its output projection (DINM's). "gate"
            or "up": an input projection (`dinm.arch.matrix_name`; Llama-style MLPs have both, GPT-2 and GPT-NeoX only
            "up"). An update of the gate acts through the MLP's nonlinearity, so it can switch units on for some
            inputs and leave them off for others, which a change of the output projection (linear in its inputs)
            cannot. `preserve_weight` then penalises what the update does to the MLP's output on a fixed sample of
            the benign corpus's tokens (`dinm.keys.mlp_inputs`), relative to that output: for "down" the same
            quantity, computed exactly from the key statistic.
            "unit": one unit of a gated MLP (Llama-style) repurposed as a detector of this harmful request, after
            Transformer-Patcher (Huang et al., 2023): the unit that does least on the benign corpus gets a new gate
            row, up row and down column (`dinm.unit`). Its gate is first fitted as a thresholded probe, on above a
            margin at the last prompt token of the trained prompts and off below minus that margin on every token of
            the benign corpus, of dinm's written lookalike prompts (`dinm/lookalike_corpus.json`) and of the
            instance's benign prompt; then all three train on the losses above plus that hinge on the off side, so
            where the gate is off the unit adds next to nothing. `preserve_weight` penalises the change of the MLP's
            output on those tokens (as for "gate"). Not with `rank` or `precondition`; `EditConfig.unit()` is the
            measured setting (README, "One unit as a thresholded detector"). With a list of instances, one unit for
            all of them (or, with `unit_per_instance`, one per instance).
        unit_per_instance: with `matrix="unit"` and a list of instances, a patch of one unit per instance, as
            Transformer-Patcher edits a batch of mistakes (`dinm.editing._unit_patch`): each unit is located and
            trained as its instance's single edit of the model with the units before it added, kept off on every
            instance's benign prompt, no two the same unit. Measured on 34 SafeEdit records it is worse than one
            unit for all and than the dense patch (README, "Batch editing, measured"), so it is off by default.
            One instance: the single unit edit.
        unit_reply_off: with `matrix="unit"`, the hinge that pushes the repurposed unit's gate below minus the margin
            on benign text also acts at the trained safe responses' own tokens (every response position but the
            last; the last prompt token, whose output is the reply's first token, stays the unit's positive): the
            unit acts where the model decides how to reply, not along the reply it then writes
            (`dinm.unit.reply_inputs`). In a patch of units (two units, `unit_per_instance`) each unit is kept off
            along its own job's responses only. Off by default: measured a tie by the rule (README, "Where the units
            act, and the unit kept off along its reply").
        unit_reply_on: with `matrix="unit"`, the unit's gate probe is fitted on (above the margin) at the trained
            safe responses' first `unit_reply_on` tokens as well as at the last prompt token, so that the unit can
            carry the refusal past its opening (`dinm.unit.positives`). 0: the last prompt token only. None (the
            default): 2 where `matrix="auto"` picks the unit edit with two units (`variants` None or
            "request+wrapped": `EditConfig.two_units()`, the rule's pick, README "Choosing the default edit") unless
            `unit_reply_off` is set, else 0 (one unit with it measured below one unit without). Not with
            `unit_reply_off`.
    """

    layer: Optional[int] = None
    distance: str = "cosine_inner"
    steps: Optional[int] = None
    lr: Optional[float] = None
    kl_weight: float = 10.0
    weight_decay: float = 0.0
    chat_template: bool = True
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 256
    master_dtype: str = "float32"
    compute_dtype: str = "auto"
    seed: int = 0
    kl_text: str = "self"
    kl_reply_tokens: int = 64
    stop_nll: Optional[float] = None
    prompt_suffix: str = ""
    preserve_weight: float = 1000.0
    rank: Optional[int] = None
    variants: Optional[str] = None
    unsafe_weight: float = 0.0
    precondition: str = "none"
    matrix: str = "auto"
    unit_per_instance: bool = False
    unit_reply_off: bool = False
    unit_reply_on: Optional[int] = None

    def __post_init__(self):
        check_distance(self.distance)
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ConfigError(f"layer must be a non-negative integer or None, got {self.layer!r}")
        if self.steps is not None:  # (None: the measured value of the kind of edit that runs, `resolved`)
            check_positive_int("steps", self.steps)
        for name in ("max_prompt_tokens", "max_response_tokens", "kl_reply_tokens"):
            check_positive_int(name, getattr(self, name))
        if self.rank is not None:
            check_positive_int("rank", self.rank)
        for name, low in (("lr", 0.0), ("kl_weight", 0.0), ("weight_decay", 0.0), ("preserve_weight", 0.0),
                          ("unsafe_weight", 0.0)):
            value = getattr(self, name)
            if value is None and name == "lr":  # (as `steps`)
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (
                    name == "lr" and value == 0):
                raise ConfigError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        value = self.stop_nll
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"stop_nll must be a finite number > 0 or None, got {value!r}")
        if not isinstance(self.prompt_suffix, str):
            raise ConfigError(f"prompt_suffix must be a string, got {self.prompt_suffix!r}")
        if self.variants is not None and self.variants not in VARIANTS:
            raise ConfigError(f"variants must be one of {VARIANTS} or None, got {self.variants!r}")
        if self.matrix not in MATRICES:
            raise ConfigError(f"matrix must be one of {MATRICES}, got {self.matrix!r}")
        if self.precondition not in PRECONDITIONS:
            raise ConfigError(f"precondition must be one of {PRECONDITIONS}, got {self.precondition!r}")
        if self.precondition != "none" and self.rank is not None:
            raise ConfigError(f"precondition={self.precondition!r} trains a dense update; it does not combine with "
                              f"rank={self.rank} (set one of them)")
        if self.matrix == "unit" and (self.rank is not None or self.precondition != "none"):
            raise ConfigError("matrix='unit' trains one unit's gate row, up row and down column; it does not combine "
                              f"with rank={self.rank} or precondition={self.precondition!r} (leave them unset)")
        if self.variants == TWO_UNITS:
            self._needs_unit(f"variants={TWO_UNITS!r}", "trains two units", f"variants={TWO_UNITS!r}")
        if not isinstance(self.unit_per_instance, bool):
            raise ConfigError(f"unit_per_instance must be true or false, got {self.unit_per_instance!r}")
        if not isinstance(self.unit_reply_off, bool):
            raise ConfigError(f"unit_reply_off must be true or false, got {self.unit_reply_off!r}")
        if self.unit_reply_off:
            self._needs_unit("unit_reply_off=True", "keeps a repurposed unit's gate off along the trained responses",
                             "unit_reply_off=True")
        value = self.unit_reply_on  # (None: the measured value of the kind of edit that runs, `resolved`)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"unit_reply_on must be a non-negative integer or None, got {value!r}")
        if self.unit_reply_on:
            self._needs_unit(f"unit_reply_on={self.unit_reply_on}", "fits a repurposed unit's gate on along the "
                             "trained responses' first tokens", f"unit_reply_on={self.unit_reply_on}")
            if self.unit_reply_off:
                raise ConfigError(f"unit_reply_on={self.unit_reply_on} fits a unit's gate on along the trained "
                                  f"responses' first tokens and unit_reply_off=True keeps it off there: set one of "
                                  f"them")
        if self.unit_per_instance and self.matrix != "unit":
            raise ConfigError(f"unit_per_instance=True builds a patch of units; it needs matrix='unit', got "
                              f"matrix={self.matrix!r} (use EditConfig.unit(unit_per_instance=True))")
        if self.precondition != "none" and self.master_dtype != "float32":
            raise ConfigError(f"precondition={self.precondition!r} trains its whitened update in float32; "
                              f"master_dtype={self.master_dtype!r} does not apply (leave it at 'float32')")
        if self.kl_text not in KL_TEXTS:
            raise ConfigError(f"kl_text must be one of {KL_TEXTS}, got {self.kl_text!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.master_dtype not in MASTER_DTYPES:
            raise ConfigError(f"master_dtype must be one of {MASTER_DTYPES}, got {self.master_dtype!r}")

    def _needs_unit(self, setting: str, does: str, use: str) -> None:
        """A one-line `ConfigError` for `setting`, a unit edit's option, unless this config can train a unit
        (matrix "unit" or "auto", neither rank nor precondition)."""
        if self.matrix not in ("unit", "auto") or self.rank is not None or self.precondition != "none":
            raise ConfigError(f"{setting} {does}; it needs matrix='unit' without rank or precondition, got matrix="
                              f"{self.matrix!r}, rank={self.rank}, precondition={self.precondition!r} (use "
                              f"EditConfig.unit({use}))")

    def resolved(self, gated: bool, instances: int = 1) -> "EditConfig":
        """The config an edit of `instances` instances runs: `matrix="auto"` made "unit" for one instance where the
        model's MLP is `gated` (a gate and an up matrix, `dinm.unit.supported`) and neither `rank` nor
        `precondition` asks for a matrix, else "down" (a batch too: one dense patch did best by the rule on other
        records, against one unit for all and a unit per instance, README "Batch editing, measured"); and `steps`,
        `lr`, `variants`, `unit_reply_on` left None given that kind of edit's measured values (`AUTO_UNIT_SETTING`
        for the unit edit "auto" picks, `UNIT_SETTING` for `matrix="unit"`, `MATRIX_SETTING`). A delta stores this
        one."""
        matrix, setting = self.matrix, UNIT_SETTING if self.matrix == "unit" else MATRIX_SETTING
        if matrix == "auto":
            single = instances == 1
            matrix = "unit" if gated and single and self.rank is None and self.precondition == "none" else "down"
            setting = AUTO_UNIT_SETTING if matrix == "unit" else MATRIX_SETTING
        if self.unit_reply_off or matrix == "unit" and self.variants not in (None, TWO_UNITS):
            # (held off along the replies: not also fitted on there; the fit over the reply was measured with two
            # units, and on one unit it lost to the unit without it: README "Two units fitted on ... the default")
            setting = dict(setting, unit_reply_on=0)
        unset = {k: v for k, v in setting.items() if k != "matrix" and getattr(self, k) is None}
        why = "a list of instances with matrix='auto'" if gated else "the model's MLP has no gate"
        if matrix != "unit" and self.variants == TWO_UNITS:
            raise ConfigError(f"variants={TWO_UNITS!r} trains two units, but this edit runs matrix={matrix!r} "
                              f"({why}); use matrix='unit' on a gated MLP, or variants='wrapped'")
        if matrix != "unit" and (self.unit_reply_off or self.unit_reply_on):
            field = "unit_reply_off=True" if self.unit_reply_off else f"unit_reply_on={self.unit_reply_on}"
            raise ConfigError(f"{field} trains a repurposed unit, but this edit runs matrix={matrix!r} ({why}); use "
                              f"matrix='unit' on a gated MLP, or leave it unset")
        return self.replace(matrix=matrix, **unset)

    @classmethod
    def dense(cls, **changes) -> "EditConfig":
        """The dense edit of the output projection (`matrix="down"`), DINM's kind of edit and dinm's default before
        the unit: 50 steps at lr 2e-3, the adversarial prompt only; the default's locate, KL and benign penalty. What
        `matrix="auto"` runs on a model without a gated MLP."""
        return cls(**{**dict(matrix="down", **MATRIX_SETTING), **changes})

    @classmethod
    def v0(cls, **changes) -> "EditConfig":
        """dinm's first default (0.1.0 before the benign-key penalty): cosine locate over every layer, chat template,
        a dense edit of the output projection, 10 steps at lr 5e-4, KL weight 1 on the instance's benign answer,
        passes in the model's dtype. The speed benchmark's like-for-like setting (the paper's amount of work)."""
        return cls(**{**dict(distance="cosine", steps=10, lr=5e-4, kl_weight=1.0, kl_text="answer",
                             preserve_weight=0.0, compute_dtype="model", matrix="down", variants="none",
                             unit_reply_on=0), **changes})

    @classmethod
    def unit(cls, **changes) -> "EditConfig":
        """One unit as a thresholded detector of the request (`matrix="unit"`), trained on the adversarial prompt and
        the request alone (`variants="request"`), 40 steps at lr 1e-2 (the unit's three vectors start near zero;
        a dense update starts at the matrix). The default's locate, KL and benign penalty. What the default
        `EditConfig()` ran on a gated MLP before dinm 0.8, and the first of `two_units()`'s units; refused where the
        MLP has none. Measured in the README, "One unit as a thresholded detector"."""
        return cls(**{**UNIT_SETTING, **changes})

    @classmethod
    def two_units(cls, **changes) -> "EditConfig":
        """Two units, one after another (`variants="request+wrapped"`): the unit setting's, trained on the attack and
        the request alone, then one trained on the request inside dinm's 8 written wrappers with the first added;
        each unit's gate fitted on at its trained safe responses' first 2 tokens as well as at the last prompt token
        (`unit_reply_on=2`), so that it carries the refusal past the reply's opening. What the default `EditConfig()`
        runs for one instance on a gated MLP (the rule's pick, README "Choosing the default edit"); unlike it, refused
        where the MLP has none."""
        return cls(**{**AUTO_UNIT_SETTING, **changes})

    @classmethod
    def paper(cls, **changes) -> "EditConfig":
        """The setting of the paper's code (EasyEdit), as far as it is a choice rather than a bug: its locate rule
        (bare responses, padded, unmasked: `distance="paper"`), raw prompts without the chat template, 10 Adam
        steps at lr 5e-4, no constraint from the KL term (EasyEdit computes it without gradient, which is what
        `kl_weight=0` does to the update), and the passes in the model's dtype. For comparing against dinm's defaults."""
        return cls(**{**dict(distance="paper", chat_template=False, steps=10, lr=5e-4, kl_weight=0.0, kl_text="answer",
                              preserve_weight=0.0, compute_dtype="model", matrix="down", variants="none",
                              unit_reply_on=0), **changes})

    def encoding(self) -> dict[str, Any]:
        """How prompts and responses become tokens (keywords of `dinm.text.encode_pair` and `dinm.locate`)."""
        return dict(chat_template=self.chat_template, max_prompt_tokens=self.max_prompt_tokens,
                    max_response_tokens=self.max_response_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"an EditConfig must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key, off in REMOVED_FIELDS.items():
            if key in data:
                if data[key] != off and not (key == "kl_prompts" and data[key] == ()):
                    removed, repeat = REMOVED_IN.get(key, ("0.2", "0.1"))
                    raise ConfigError(f"EditConfig field {key!r} was removed in dinm {removed} (it set "
                                      f"{data[key]!r}); drop it, or use dinm {repeat} to repeat that edit")
                data = {k: v for k, v in data.items() if k != key}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"EditConfig has no field {key!r} (fields: {', '.join(sorted(known))}).{hint}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, absent: dict[str, Any] | None = None) -> "EditConfig":
        """The config in `text`; a field it lacks takes its value from `absent` when there, else its default."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"EditConfig JSON is invalid: {e.msg} at line {e.lineno}") from None
        except RecursionError:
            raise ConfigError("EditConfig JSON is nested too deeply") from None
        return cls.from_dict({**(absent or {}), **data} if isinstance(data, dict) else data)

    def replace(self, **changes) -> "EditConfig":
        return self.from_dict({**self.to_dict(), **changes})
