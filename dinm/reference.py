"""Pure-PyTorch versions of dinm's numeric kernels: the CPU fallback and the test oracle."""

from __future__ import annotations

import torch

DISTANCE_KINDS = ("cosine", "l2", "l2_tokens")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # x: (layers, pairs, tokens, hidden), mask: (pairs, tokens) -> (layers, pairs, hidden)
    m = mask.to(torch.float32)[None, :, :, None]
    return (x.float() * m).sum(dim=2) / m.sum(dim=2).clamp_min(1.0)


def layer_distances(hidden: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-layer, per-pair distance between the hidden states of two responses.

    Args:
        hidden: (layers, 2 * pairs, tokens, hidden); rows 2p and 2p + 1 are pair p's responses a and b.
        mask_a, mask_b: (pairs, tokens) bool, the positions of response a / b that count.
        kind: "l2" (L2 between the masked means), "cosine" (1 - cosine of the masked means) or
            "l2_tokens" (L2 over the positions both masks keep, position by position: the paper's
            `torch.dist`, restricted to real tokens).

    Returns:
        (layers, pairs) float32.
    """
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
