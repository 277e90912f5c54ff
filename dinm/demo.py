"""The demo (`dinm demo`): one real edit of the embedded SmolLM2-135M-Instruct, replies before and after.

The workflow is `run`; `DemoReport.text` is what the command prints."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from .config import EditConfig
from .delta import Delta, fingerprint
from .editing import edit
from .generate import generate
from .history import describe, phases
from .instance import load_instance
from .judge import is_refusal
from .locating import distance_chart
from .models import EMBEDDED, load_model
from .plot import plot_distances


@dataclass
class DemoReport:
    """What the demo did: the prompts (label, text), the greedy replies before and after the edit, the delta and
    where it and the plot were written, and whether revert gave back the original weights bit for bit."""

    prompts: list[tuple[str, str]]
    before: list[str]
    after: list[str]
    delta: Delta
    config: EditConfig
    delta_path: str
    plot_path: str | None
    seconds: float
    restored: bool

    def text(self) -> str:
        lines = ["", "=== greedy replies, same prompts before and after the edit"]
        for (label, prompt), before, after in zip(self.prompts, self.before, self.after):
            lines += ["", f"[{label}] {prompt}"]
            lines += [f"  {tag} {'REFUSES ' if is_refusal(reply) else 'answers '}| {reply!r}"
                      for tag, reply in (("before", before), ("after ", after))]
        d, timing = self.delta, self.delta.summary().get("seconds", {})
        lines += ["", "=== the edit", where(d, self.config.distance),
                  f"edited {what(d)} in {self.seconds:.1f}s ({phases(timing, 'unit' in d.metadata or bool(d.units))}; "
                  f"passes in {d.metadata.get('compute', '?')}): {describe(d.history)}",
                  f"delta: {self.delta_path} ({_size(os.path.getsize(self.delta_path))}, only what was edited)"
                  + (f"; plot: {self.plot_path}" if self.plot_path else ""),
                  f"revert restored the original weights bit for bit: {'yes' if self.restored else 'NO'}"]
        return "\n".join(lines)


def located(delta: Delta) -> tuple[list[float], int | None]:
    """The per-layer distances and the layer they chose: the delta's, or for a patch of units its first unit's (each
    unit is located on its own; the first, on the unedited model, is the instance's own locate)."""
    if delta.units:
        return delta.units[0].get("distances") or [], delta.units[0]["layer"]
    return delta.distances, delta.layer


def where(delta: Delta, distance: str) -> str:
    """Which layer the edit located, with the per-layer distances as a chart (for a patch of units, the first
    unit's, and the layers of the others)."""
    distances, layer = located(delta)
    if not distances:
        return f"layer {layer} (given, not located)"
    text = f"located layer {layer} ({distance} distance over {len(distances)} layers):\n" + distance_chart(distances,
                                                                                                       layer)
    for k, unit in enumerate(delta.units[1:], 2):
        text += f"\nunit {k} ({unit['variants']}) located layer {unit['layer']} on the model with the units before it"
    return text


def what(delta: Delta) -> str:
    """"unit 17 of layer 22 (its gate row, up row and down column)", "2 units: unit 17 of layer 22 (request), ...",
    or the edited tensors' names."""
    if "unit" in delta.metadata:
        return f"unit {delta.metadata['unit']} of layer {delta.layer} (its gate row, up row and down column)"
    if delta.units:
        return (f"{len(delta.units)} units: " + ", ".join(f"unit {u['unit']} of layer {u['layer']} ({u['variants']})"
                                                          for u in delta.units)
                + " (each its gate row, up row and down column)")
    return ", ".join(delta.names)


def run(instance_path: str = "data/example.json", out_dir: str = "demo_out", *, max_new_tokens: int = 60,
        config: EditConfig | None = None, say: Callable[[str], None] = lambda _: None) -> DemoReport:
    """Edit the embedded model from the instance in `instance_path`, save the delta and a plot of the per-layer
    distances (needs matplotlib, the `plot` extra) in `out_dir`, and answer the instance's prompts before and after
    the edit. `say` receives progress messages."""
    instance = load_instance(instance_path)  # bad input fails before the model is loaded
    config = config or EditConfig()
    os.makedirs(out_dir, exist_ok=True)
    say("loading the embedded model (SmolLM2-135M-Instruct, GGUF) ...")
    model, tokenizer = load_model(EMBEDDED)
    prompts = [("adversarial prompt", instance.prompt), ("benign prompt", instance.benign_prompt)]
    prompts += [(f"held out: {k}", v) for k, v in instance.generalization.items()]
    texts = [p for _, p in prompts]

    before = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens)
    started = time.perf_counter()
    delta = edit(model, tokenizer, instance, config, progress=True)
    seconds = time.perf_counter() - started
    delta_path = os.path.join(out_dir, "delta.safetensors")
    delta.save(delta_path)
    distances, layer = located(delta)
    plot_path = os.path.join(out_dir, "distances.png") if distances else None  # (none for a given layer)
    if plot_path:
        plot_distances(distances, layer, plot_path,
                       title=f"SmolLM2-135M-Instruct, {config.distance} distance (toxic layer {layer})")
    base = [fingerprint(model.get_parameter(name)) for name in delta.names]
    with delta.applied(model):
        after = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens)
    restored = [fingerprint(model.get_parameter(name)) for name in delta.names] == base
    return DemoReport(prompts, before, after, delta, config, delta_path, plot_path, seconds, restored)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"
