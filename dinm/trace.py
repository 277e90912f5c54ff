"""Forward hooks and forward replacements, only inside context managers (or calls) that undo them in `finally`
(cf. ROME's `nethook.Trace`). Every hook dinm registers is registered here."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

_MISSING = object()


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def record_outputs(modules: list[nn.Module], whole: bool = False) -> Iterator[list[Any]]:
    """Record each module's output (its first element unless `whole`) during the forward passes run inside
    the block."""
    outputs: list[Any] = [None] * len(modules)
    handles = []

    def hook(index: int):
        def store(_module, _inputs, output):
            outputs[index] = output if whole else _first(output).detach()
        return store

    try:
        for i, module in enumerate(modules):
            handles.append(module.register_forward_hook(hook(i)))
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replacing_forwards(modules: list[nn.Module], forwards: list) -> Iterator[None]:
    """Inside the block each module's forward is the matching callable (hooks still run around it)."""
    saved = []
    try:
        for module, forward in zip(modules, forwards):
            saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = forward
        yield
    finally:
        for module, forward in saved:
            if forward is _MISSING:
                del module.forward
            else:
                module.forward = forward


def replay_outputs(modules: list[nn.Module], outputs: list[Any]):
    """Inside the block each module returns its recorded output instead of running (frozen layers below an
    edited one need not run again: their output cannot change)."""
    return replacing_forwards(modules, [(lambda out: lambda *args, **kwargs: out)(o) for o in outputs])


def passthrough(module: nn.Module):
    """Inside the block `module` returns its input unchanged."""
    return replacing_forwards([module], [lambda x, *args, **kwargs: x])


@contextlib.contextmanager
def adding(module: nn.Module, update: torch.Tensor) -> Iterator[None]:
    """Inside the block `module` (a Linear, or GPT-2's Conv1D) returns its output plus `x @ update.T`, `update` as
    (out, in) in any dtype (cast to the input's). An edit entered as a separate term is not rounded away: in bf16,
    `W + D` loses every element of `D` below half of `W`'s spacing there."""
    handle = module.register_forward_hook(lambda _m, args, out: out + F.linear(args[0], update.to(args[0].dtype)))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def adding_term(module: nn.Module, term) -> Iterator[None]:
    """Inside the block `module` returns its output plus `term(x)`, x its first input (`dinm.unit`: a repurposed MLP
    unit's new output minus its old one)."""
    handle = module.register_forward_hook(lambda _m, args, out: out + term(args[0]))
    try:
        yield
    finally:
        handle.remove()


class _Reached(Exception):
    """Raised by `input_of`'s hook once the module's input is read: the layers above need not run."""


def input_of(module: nn.Module, forward) -> torch.Tensor:
    """Run `forward()` (a call of the model) up to `module` and return `module`'s first input, detached; the rest
    of the model does not run."""
    seen = []

    def read(_module, args):
        seen.append(args[0].detach())
        raise _Reached

    handle = module.register_forward_pre_hook(read)
    try:
        forward()
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the forward pass never reached {type(module).__name__}")
    return seen[0]
