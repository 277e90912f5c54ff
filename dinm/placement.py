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
    """The device `module` computes on: its hook's execution device under accelerate, else its weights'."""
    device = getattr(_hook(module), "execution_device", None)
    if device is not None:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device


def execution_device(model, name: str) -> torch.device:
    """The device parameter `name`'s module computes on."""
    return module_device(_split(model, name)[0])


def stored(model, name: str) -> tuple[torch.Tensor, bool]:
    """(the tensor holding parameter `name`'s values, whether writing it in place changes the model).

    An offloaded parameter is read from its hook's weights map: in memory (CPU offload) that tensor is the one
    the hook loads from, so it can be written; read from disk each time, it cannot.
    """
    module, leaf = _split(model, name)
    param = getattr(module, leaf)
    if param.device.type != "meta":
        return param.data, True
    weights = getattr(_hook(module), "weights_map", None)
    if weights is None:
        raise DeltaError(f"parameter {name!r} is on the meta device and no accelerate hook holds its values; "
                         f"load the model with its weights")
    first, second = weights[leaf], weights[leaf]
    return first, first.data_ptr() == second.data_ptr()


def writable(model, name: str, action: str) -> torch.Tensor:
    """The tensor to change in place for parameter `name`, or a DeltaError saying why it cannot be."""
    tensor, can_write = stored(model, name)
    if not can_write:
        raise DeltaError(f"cannot {action} in place: parameter {name!r} is offloaded to disk by accelerate; "
                         f"{action} the delta to the checkpoint folder instead (`dinm {action} DELTA FOLDER -o NEW`) "
                         f"and load that, or keep its layer in memory (device_map / max_memory)")
    return tensor
