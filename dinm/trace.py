"""Forward hooks, only inside context managers that remove them (cf. ROME's `nethook.Trace`)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def record_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record each module's (first) output during the forward passes run inside the block."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)
    handles = []

    def hook(index: int):
        def store(_module, _inputs, output):
            outputs[index] = _first(output).detach()
        return store

    try:
        for i, module in enumerate(modules):
            handles.append(module.register_forward_hook(hook(i)))
        yield outputs
    finally:
        for h in handles:
            h.remove()
