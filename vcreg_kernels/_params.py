"""The regulariser's five scalars as one value, and the argument checks of SPEC section 5.

Checks are raised when the op is called (not in the backward), by every entry point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Params:
    """alpha, beta (weights of the variance and covariance terms), eps (inside the square root),
    gamma (target standard deviation), delta (None: squared covariances; a number: the paper's
    smooth L1 with that threshold). SPEC section 2."""

    alpha: float
    beta: float
    eps: float = 1e-4
    gamma: float = 1.0
    delta: Optional[float] = None

    @classmethod
    def of(cls, alpha, beta, eps, gamma, delta) -> "Params":
        """From the op's arguments, as Python floats (a backend may pass them to compiled code)."""
        return cls(float(alpha), float(beta), float(eps), float(gamma), None if delta is None else float(delta))

    def values(self) -> tuple:
        """(alpha, beta, eps, gamma, delta): the order of the op schemas."""
        # Not dataclasses.astuple, which deep-copies each field (3.5 us against 0.2 per call).
        return (self.alpha, self.beta, self.eps, self.gamma, self.delta)

    def check(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"vcreg: eps must be > 0, got {self.eps}")
        if not self.alpha >= 0:
            raise ValueError(f"vcreg: alpha must be >= 0, got {self.alpha}")
        if not self.beta >= 0:
            raise ValueError(f"vcreg: beta must be >= 0, got {self.beta}")
        if self.delta is not None and not self.delta > 0:
            raise ValueError(f"vcreg: delta must be > 0 or None, got {self.delta}")
        if not math.isfinite(self.gamma):
            raise ValueError(f"vcreg: gamma must be finite, got {self.gamma}")


SCALES = ("exact", "paper")


def check_scale(scale: str) -> None:
    """The layer's ``scale`` (SPEC section 3): "exact", or "paper" (beta * (n - 1) is the covariance coefficient)."""
    if scale not in SCALES:
        raise ValueError(f"vcreg: scale must be one of {SCALES}, got {scale!r}")


def check_args(x: torch.Tensor, params: Params, dim: int, *, min_samples: int = 2) -> int:
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
    params.check()
    return dim


def check_vicreg_args(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    sim_coeff: float,
    std_coeff: float,
    cov_coeff: float,
    eps: float,
    gamma: float,
    *,
    min_samples: int = 2,
) -> None:
    """Validate the VICReg loss's arguments (SPEC sections 5 and 9): two floating branches of one
    shape (..., d), n >= 2 samples (``min_samples=0`` in the cross-rank mode, where only the
    group's n must reach 2: checked in the forward, identically on every rank)."""
    if not (z_a.is_floating_point() and z_b.is_floating_point()):
        raise TypeError(f"vicreg_loss: z_a and z_b must be floating-point tensors, got {z_a.dtype} and {z_b.dtype}")
    if z_a.shape != z_b.shape:
        raise ValueError(f"vicreg_loss: the two branches must have the same shape, got z_a of shape "
                         f"{tuple(z_a.shape)} and z_b of shape {tuple(z_b.shape)}")
    if z_a.dtype != z_b.dtype:
        raise TypeError(f"vicreg_loss: the two branches must have the same dtype, got {z_a.dtype} and {z_b.dtype}")
    if z_a.device != z_b.device:
        raise ValueError(f"vicreg_loss: the two branches must be on one device, got {z_a.device} and {z_b.device}")
    shape = tuple(z_a.shape)
    d = z_a.size(-1)  # IndexError for a 0-dim tensor, with torch's own message
    if d == 0:
        raise ValueError(f"vicreg_loss: the feature dimension (the last) of z_a and z_b with shape {shape} is empty (d = 0)")
    n = math.prod(shape) // d
    if n < min_samples:
        raise ValueError(f"vicreg_loss: needs at least 2 samples, got n = {n} for z_a and z_b of shape {shape} "
                         "(every dimension but the last is a sample dimension)")
    if not eps > 0:
        raise ValueError(f"vicreg_loss: eps must be > 0, got {eps}")
    for name, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
        if not value >= 0:
            raise ValueError(f"vicreg_loss: {name} must be >= 0, got {value}")
    if not math.isfinite(gamma):
        raise ValueError(f"vicreg_loss: gamma must be finite, got {gamma}")
