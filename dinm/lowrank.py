"""Low-rank updates: an update D (out, in) kept as two factors, ``D = up @ down`` (up: (out, r), down: (r, in)).

* `compose(up, down)`: D from its factors, bit-identical on every machine: the r outer products are added one by
  one (each product and sum rounded once, in a fixed order), never through a matrix-multiply kernel whose
  summation order depends on the CPU or GPU. A factored delta's recorded fingerprints rest on it.
* `truncate(d, rank=..., energy=...)`: the best rank-r approximation of a dense update (truncated SVD,
  Eckart-Young), with its relative Frobenius error ``||D - D_r||_F / ||D||_F``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .errors import ConfigError


def compose(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` in fp32 as a sum of rank-one terms in a fixed order (deterministic across machines)."""
    up, down = up.float(), down.float()
    out = torch.zeros(up.shape[0], down.shape[1], dtype=torch.float32, device=up.device)
    for k in range(up.shape[1]):
        out.add_(up[:, k:k + 1] * down[k:k + 1, :])  # the product is rounded, then the sum: no fused multiply-add
    return out


@dataclasses.dataclass
class Truncated:
    """A rank-`rank` approximation ``up @ down`` of an update, its relative Frobenius error, and the update's
    singular values (largest first)."""

    up: torch.Tensor
    down: torch.Tensor
    rank: int
    error: float
    singular_values: torch.Tensor


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values hold `energy` (0 < energy <= 1) of the sum of their squares."""
    if not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    held = torch.cumsum(squares, 0) / total
    return min(int((held < energy - 1e-12).sum()) + 1, len(singular_values))


def truncate(d: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Truncated:
    """The truncated SVD of `d` (2-D) at `rank`, or at the smallest rank holding `energy` of its squared singular
    values. The factors share the singular values evenly (``up = U sqrt(S)``, ``down = sqrt(S) V^T``), so neither
    is far larger than the other in a low-precision adapter."""
    if (rank is None) == (energy is None):
        raise ConfigError("give either a rank or an energy for the truncation")
    if d.dim() != 2:
        raise ConfigError(f"only a 2-D update can be factored, got shape {list(d.shape)}")
    u, s, vh = torch.linalg.svd(d.detach().double().cpu(), full_matrices=False)
    if rank is None:
        rank = rank_for_energy(s, energy)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    rank = min(rank, len(s))
    total = float((s ** 2).sum())
    error = math.sqrt(float((s[rank:] ** 2).sum()) / total) if total > 0 else 0.0
    root = s[:rank].sqrt()
    return Truncated(up=(u[:, :rank] * root).float(), down=(root[:, None] * vh[:rank]).float(), rank=rank,
                     error=error, singular_values=s.float())
