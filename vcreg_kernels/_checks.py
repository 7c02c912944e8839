"""Argument checks of SPEC section 5, shared by every entry point (raised when the op is called)."""
from __future__ import annotations

import math
from typing import Optional

import torch


def check_args(
    x: torch.Tensor,
    alpha: float,
    beta: float,
    eps: float,
    gamma: float,
    delta: Optional[float],
    dim: int,
    *,
    min_samples: int = 2,
) -> int:
    """Validate the op's arguments; return ``dim`` normalised to ``0 <= dim < x.dim()``.

    ``min_samples=0`` for the cross-rank mode, where only the global n must reach 2 (checked in
    the backward, identically on every rank: ``distributed.py``).
    """
    if not x.is_floating_point():
        raise TypeError(f"vcreg: x must be a floating-point tensor, got dtype {x.dtype}")
    d = x.size(dim)  # IndexError for an out-of-range dim, with torch's own message
    dim = dim % x.dim()
    shape = tuple(x.shape)
    if d == 0:
        raise ValueError(f"vcreg: the feature dimension dim={dim} of x with shape {shape} is empty (d = 0)")
    n = math.prod(shape) // d
    if n < min_samples:
        raise ValueError(
            f"vcreg: needs at least 2 samples, got n = {n} for x of shape {shape} with feature dim={dim}"
        )
    if not eps > 0:
        raise ValueError(f"vcreg: eps must be > 0, got {eps}")
    if not alpha >= 0:
        raise ValueError(f"vcreg: alpha must be >= 0, got {alpha}")
    if not beta >= 0:
        raise ValueError(f"vcreg: beta must be >= 0, got {beta}")
    if delta is not None and not delta > 0:
        raise ValueError(f"vcreg: delta must be > 0 or None, got {delta}")
    if not math.isfinite(gamma):
        raise ValueError(f"vcreg: gamma must be finite, got {gamma}")
    return dim
