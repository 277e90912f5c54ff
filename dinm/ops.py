"""dinm's numeric ops, from the compiled extension (`dinm._C`, csrc/) when it was built, else from the
pure-PyTorch twin (`dinm.twin`). Both give the same results (tests/test_ops.py); `backend()` says which
one runs.

    dinm.ops.layer_distances(hidden, mask_a, mask_b, kind)  # (layers, pairs) float32, one pass
    dinm.ops.masked_update(weight, delta, mask, alpha)      # weight += alpha * (delta ⊙ mask), in place
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from . import twin

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple[bool, str]:
    """(loaded, why) — loading registers torch.ops.dinm.*; logged once."""
    for name in ("DINM_FORCE_TWIN", "DINM_FORCE_REFERENCE"):  # (the second: dinm 0.1's name)
        if os.environ.get(name) == "1":
            return False, f"{name}=1"
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        logger.info("dinm: compiled ops unavailable (%s); using the PyTorch twin", e)
        return False, f"not built ({e})"
    _register_fakes()
    return True, "compiled"


def _register_fakes() -> None:
    """Shapes and dtypes without computing (FakeTensor / torch.compile / meta)."""

    @torch.library.register_fake("dinm::layer_distances")
    def _(hidden, mask_a, mask_b, kind):
        return hidden[0].new_empty((len(hidden), hidden[0].shape[0] // 2), dtype=torch.float32)

    @torch.library.register_fake("dinm::masked_update")
    def _(weight, delta, mask, alpha):
        return None


OPS = ("layer_distances", "masked_update")


def kernels() -> dict[str, list[str]]:
    """For each op, the dispatch keys ("CPU", "CUDA") the loaded extension registered a kernel for (none when the
    twin runs)."""
    if not _compiled()[0]:
        return {op: [] for op in OPS}
    return {op: [d for d in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"dinm::{op}", d)]
            for op in OPS}


def _devices() -> list[str]:
    """The devices on which every op has a kernel."""
    registered = kernels()
    return [d for d in ("CPU", "CUDA") if all(d in keys for keys in registered.values())]


def backend() -> str:
    """"compiled (CPU)", "compiled (CPU, CUDA)" or "twin (why)"."""
    loaded, why = _compiled()
    return f"compiled ({', '.join(_devices())})" if loaded else f"twin ({why})"


def _use_compiled(device: torch.device) -> bool:
    return _compiled()[0] and device.type.upper() in _devices()


def layer_distances(hidden, mask_a: torch.Tensor, mask_b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-layer, per-pair distances of two responses' hidden states: `hidden` is one (2 * pairs, tokens,
    hidden) tensor per layer, or them stacked; see `dinm.twin.layer_distances`."""
    layers = list(hidden.unbind(0)) if isinstance(hidden, torch.Tensor) else list(hidden)
    if _use_compiled(layers[0].device):
        return torch.ops.dinm.layer_distances(layers, mask_a.to(torch.bool), mask_b.to(torch.bool), kind)
    return twin.layer_distances(hidden, mask_a.to(torch.bool), mask_b.to(torch.bool), kind)


def masked_update(weight: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None = None,
                  alpha: float = 1.0) -> None:
    """`weight += alpha * (delta ⊙ mask)` in place; see `dinm.twin.masked_update`."""
    if _use_compiled(weight.device) and weight.is_contiguous():
        torch.ops.dinm.masked_update(weight, delta, mask, float(alpha))
    else:
        twin.masked_update(weight, delta, mask, alpha)


def check(require: tuple[str, ...] = ("CPU",)) -> str:
    """One line saying where `dinm._C` was loaded from and which kernels each op has; `RuntimeError` when an op lacks
    a kernel for a device in `require` (what `make cuda-build` runs, with `require=("CPU", "CUDA")`)."""
    loaded, why = _compiled()
    if not loaded:
        raise RuntimeError(f"dinm._C is not loaded: {why}")
    from . import _C

    registered = kernels()
    missing = [f"{op} on {d}" for op, keys in registered.items() for d in require if d not in keys]
    line = (f"dinm._C {_C.__file__}: " + ", ".join(f"{op} {'+'.join(keys) or 'none'}" for op, keys in registered.items())
            + f" (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
    if missing:
        raise RuntimeError(f"{line}; no kernel for {', '.join(missing)}")
    return line


if __name__ == "__main__":  # python -m dinm.ops [CPU CUDA ...]: the one-line check
    import sys

    print(check(tuple(sys.argv[1:]) or ("CPU",)))
