"""`Step`: what one optimiser step of an edit recorded; a delta's `history` is a list of them.

Stored in a delta's metadata as JSON objects (`Step.to_dict`), the keys present only when set: a stopped edit's
last record has no `kl` (the step did not run), an edit without the benign-key penalty records no `moved`.
`describe` and `phases` put a history and a delta's recorded seconds into words for the CLI and the demo.
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
        unsafe: how far the unsafe response's mean NLL still is below its goal (`dinm.terms.UnsafeHinge`); None
            without that term.
        off: how far benign inputs (with `unit_reply_off`, and the trained responses' tokens) still reach the
            repurposed unit's gate (`dinm.unit.UnitHinge`); None but for `matrix="unit"`.
        loss: the total loss the step descended; None when it did not run.
        stopped: the edit stopped here (`EditConfig.stop_nll` reached): no update was made at this step.
    """

    step: int
    nll: float
    kl: Optional[float] = None
    moved: Optional[float] = None
    unsafe: Optional[float] = None
    off: Optional[float] = None
    loss: Optional[float] = None
    stopped: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v is not False}

    @classmethod
    def from_dict(cls, data: dict) -> "Step":
        """The step in `data`; keys this dinm does not know (a newer one's) are ignored."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def summary(history: list[Step]) -> dict:
    """Steps run, first and last NLL, the last record's KL: what the CLI and `evaluate`'s report give of an edit."""
    if not history:
        return {"steps_run": 0, "nll_first": None, "nll_last": None, "kl_last": None, "stopped": False}
    return {"steps_run": sum(not s.stopped for s in history), "nll_first": history[0].nll,
            "nll_last": history[-1].nll, "kl_last": history[-1].kl,  # (None for a stopped edit's last record)
            "stopped": history[-1].stopped}


def describe(history: list[Step]) -> str:
    """One line, e.g. "50 steps, safe-response NLL 2.314 -> 0.412, benign KL 0.0031"."""
    if not history:
        return "no steps"
    s = summary(history)
    kl = next((step.kl for step in reversed(history) if step.kl is not None), None)
    line = (f"{s['steps_run']} step{'' if s['steps_run'] == 1 else 's'}, safe-response NLL {s['nll_first']:.3f} -> "
            f"{s['nll_last']:.3f}")
    if kl is not None:
        line += f", benign KL {kl:.4f}"
    return line + (" (stopped early: the safe response was likely enough)" if s["stopped"] else "")


def phases(seconds: dict, unit: bool = False) -> str:
    """Where an edit's time went, from the "seconds" its delta records (a delta from before dinm recorded the
    phases has only locate and edit). `unit`: the delta is a unit's (`matrix="unit"`), whose "keys" seconds are its
    negatives' inputs and its gate probe's fit rather than the benign-key statistic."""
    if "forward" not in seconds:
        return f"locate {seconds.get('locate', 0):.1f}s, edit {seconds.get('edit', 0):.1f}s"
    return (f"locate {seconds.get('locate', 0):.1f}s, the model's own benign reply {seconds.get('reply', 0):.1f}s, "
            f"{'the unit: negatives and probe' if unit else 'benign-key statistic'} {seconds.get('keys', 0):.1f}s, "
            f"steps {seconds.get('forward', 0) + seconds.get('backward', 0):.1f}s")
