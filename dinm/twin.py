"""Pure-PyTorch versions of dinm's numeric kernels: the CPU fallback and the test oracle."""

from __future__ import annotations

import torch

DISTANCE_KINDS = ("cosine", "l2", "l2_tokens")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # x: (layers, pairs, tokens, hidden), mask: (pairs, tokens) -> (layers, pairs, hidden)
    m = mask.to(torch.float32)[None, :, :, None]
    return (x.float() * m).sum(dim=2) / m.sum(dim=2).clamp_min(1.0)


def layer_distances(hidden, mask_a: torch.Tensor, mask_b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-layer, per-pair distance between the hidden states of two responses.

    Args:
        hidden: one (2 * pairs, tokens, hidden) tensor per layer (a list), or them stacked
            (layers, 2 * pairs, tokens, hidden); rows 2p and 2p + 1 are pair p's responses a and b.
        mask_a, mask_b: (pairs, tokens) bool, the positions of response a / b that count.
        kind: "l2" (L2 between the masked means), "cosine" (1 - cosine of the masked means) or
            "l2_tokens" (L2 over the positions both masks keep, position by position: the paper's
            `torch.dist`, restricted to real tokens).

    Returns:
        (layers, pairs) float32.
    """
    if not isinstance(hidden, torch.Tensor):
        hidden = torch.stack(list(hidden))
    a, b = hidden[:, 0::2], hidden[:, 1::2]  # (layers, pairs, tokens, hidden)
    if kind == "l2_tokens":
        both = (mask_a & mask_b).to(torch.float32)[None, :, :, None]
        return (((a.float() - b.float()) ** 2) * both).sum(dim=(2, 3)).sqrt()
    mean_a, mean_b = _masked_mean(a, mask_a), _masked_mean(b, mask_b)
    if kind == "l2":
        return (mean_a - mean_b).norm(dim=-1)
    if kind == "cosine":
        return 1.0 - torch.nn.functional.cosine_similarity(mean_a, mean_b, dim=-1, eps=1e-12)
    raise ValueError(f"distance kind {kind!r} is not one of {DISTANCE_KINDS}")


def masked_update(weight: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None = None,
                  alpha: float = 1.0) -> None:
    """`weight += alpha * (delta ⊙ mask)` in place, rounding once per element (as `Tensor.add_`); elements
    outside the mask keep every bit.

    Args:
        weight: the tensor to update (contiguous).
        delta: same dtype; weight's shape, or with a row mask (masked rows, cols): only the masked rows, in order.
        mask: None (every element), bool of weight's shape (elements) or bool (rows,) (rows of a 2-D weight).
    """
    if mask is None:
        weight.add_(delta, alpha=alpha)
    elif mask.shape == weight.shape:
        weight.copy_(torch.where(mask, torch.add(weight, delta, alpha=alpha), weight))
    else:
        rows = mask.nonzero().reshape(-1)
        update = delta.index_select(0, rows) if delta.shape[0] == weight.shape[0] else delta
        weight.index_copy_(0, rows, torch.add(weight.index_select(0, rows), update, alpha=alpha))
