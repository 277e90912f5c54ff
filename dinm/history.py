"""`Step`: what one optimiser step of an edit recorded; a delta's `history` is a list of them.

Stored in a delta's metadata as JSON objects (`Step.to_dict`), the keys present only when set: a stopped edit's
last record has no `kl` (the step did not run), an edit without the benign-key penalty records no `moved`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Step:
    """One step of an edit.

    Attributes:
        step: its index, from 0.
        nll: mean NLL per token of the safe response to the adversarial prompt, before the step's update.
        kl: KL(unedited || edited) on the benign sequence (`dinm.terms.BenignKL`); None when the step did not run.
        moved: what the update does to benign inputs of the edited matrix, relative to the matrix
            (`dinm.terms.KeyPenalty`); None without that penalty.
        loss: the total loss the step descended; None when it did not run.
        stopped: the edit stopped here (`EditConfig.stop_nll` reached): no update was made at this step.
    """

    step: int
    nll: float
    kl: Optional[float] = None
    moved: Optional[float] = None
    loss: Optional[float] = None
    stopped: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v is not False}

    @classmethod
    def from_dict(cls, data: dict) -> "Step":
        """The step in `data`; keys this dinm does not know (a newer one's) are ignored."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def summary(history: list[Step]) -> dict:
    """First and last NLL, last KL, steps run: what the CLI, `evaluate`'s report and the demo show of an edit."""
    ran = [s for s in history if not s.stopped]
    return {"steps_run": len(ran), "nll_first": history[0].nll if history else None,
            "nll_last": history[-1].nll if history else None, "kl_last": ran[-1].kl if ran else None,
            "stopped": bool(history) and history[-1].stopped}


def describe(history: list[Step]) -> str:
    """One line, e.g. "50 steps, safe-response NLL 2.314 -> 0.412, benign KL 0.0031"."""
    if not history:
        return "no steps"
    s = summary(history)
    line = (f"{s['steps_run']} step{'' if s['steps_run'] == 1 else 's'}, safe-response NLL {s['nll_first']:.3f} -> "
            f"{s['nll_last']:.3f}")
    if s["kl_last"] is not None:
        line += f", benign KL {s['kl_last']:.4f}"
    return line + (" (stopped early: the safe response was likely enough)" if s["stopped"] else "")
