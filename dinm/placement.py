"""Where a parameter's values live when accelerate spread the model over devices (`device_map="auto"`).

A module that accelerate offloaded holds its parameters on the "meta" device; its hook loads the values from a
weights map before each forward, onto the hook's execution device. dinm reads (and, for deltas, writes) those
values there instead of the empty parameter. Without accelerate hooks every function here is the plain answer.
"""

from __future__ import annotations

import torch

from .errors import DeltaError


def _hook(module):
    """The accelerate `AlignDevicesHook` of `module`, or None (a `SequentialHook` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        if h is not None and hasattr(h, "execution_device"):
            return h
    return None


def _split(model, name: str):
    module_name, _, leaf = name.rpartition(".")
    return model.get_submodule(module_name), leaf


def module_device(module) -> torch.device:
    """The device `module` computes on: under accelerate its hook's execution device, or for a block without a hook
    of its own (`cpu_offload` hooks the leaves: an MLP's weights are on "meta" between forwards) its first hooked
    submodule's; else its weights'."""
    for part in module.modules():  # (the module itself first)
        device = getattr(_hook(part), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device


def stored(model, name: str) -> torch.Tensor:
    """The tensor holding parameter `name`'s values: the parameter's own, or for an offloaded one (on "meta") the
    one its accelerate hook loads before each forward, read from the hook's weights map."""
    module, leaf = _split(model, name)
    param = getattr(module, leaf)
    if param.device.type != "meta":
        return param.data
    weights = getattr(_hook(module), "weights_map", None)
    if weights is None:
        raise DeltaError(f"parameter {name!r} is on the meta device and no accelerate hook holds its values; "
                         f"load the model with its weights")
    return weights[leaf]


def writable(model, name: str, action: str) -> torch.Tensor:
    """The tensor to change in place for parameter `name`, or a DeltaError saying why it cannot be. An offloaded
    parameter kept in memory (CPU offload) is the same tensor at every read, so writing it changes what the hook
    loads; one read from disk is a new tensor each time and cannot be written."""
    tensor = stored(model, name)
    if model.get_parameter(name).is_meta and stored(model, name).data_ptr() != tensor.data_ptr():
        raise DeltaError(f"cannot {action} in place: parameter {name!r} is offloaded to disk by accelerate; "
                         f"{action} the delta to the checkpoint folder instead (`dinm {action} DELTA FOLDER -o NEW`) "
                         f"and load that, or keep its layer in memory (device_map / max_memory)")
    return tensor
