"""User-facing function and nn.Module around ``torch.ops.vcreg.fused``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _ops  # noqa: F401  (registers the ops)


def vcreg(
    x: torch.Tensor,
    alpha: float = 0.16,
    beta: float = 0.01,
    eps: float = 1e-4,
    gamma: float = 1.0,
    delta: Optional[float] = None,
    dim: int = -1,
) -> torch.Tensor:
    """Identity in the forward; the backward adds the gradient of the VCReg loss (SPEC section 2)."""
    return torch.ops.vcreg.fused(x, alpha, beta, eps, gamma, delta, dim)


class VCReg(nn.Module):
    """A VCReg layer: ``VCReg(alpha, beta, dim=1)(h)`` returns h and regularises it in the backward.

    Use ``dim=1`` after convolutional blocks (NCHW or channels_last), ``dim=-1`` after
    transformer blocks ((batch, tokens, features)).
    """

    def __init__(
        self,
        alpha: float = 0.16,
        beta: float = 0.01,
        eps: float = 1e-4,
        gamma: float = 1.0,
        delta: Optional[float] = None,
        dim: int = -1,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.eps, self.gamma, self.delta, self.dim = alpha, beta, eps, gamma, delta, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return vcreg(x, self.alpha, self.beta, self.eps, self.gamma, self.delta, self.dim)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, eps={self.eps}, gamma={self.gamma}, "
                f"delta={self.delta}, dim={self.dim}")
