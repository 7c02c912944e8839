"""User-facing function and nn.Module around ``torch.ops.vcreg.fused``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _ops
from ._params import Params, check_scale
from .distributed import group_key


def vcreg(
    x: torch.Tensor,
    alpha: float = 0.16,
    beta: float = 0.01,
    eps: float = 1e-4,
    gamma: float = 1.0,
    delta: Optional[float] = None,
    dim: int = -1,
    scale: str = "exact",
) -> torch.Tensor:
    """Identity in the forward; the backward adds the gradient of the VCReg loss (SPEC section 2).

    ``scale="paper"``: the covariance coefficient is beta * (n - 1), n the sample count of x (of the
    group's batch in the cross-rank mode), so that the paper's alpha/beta grid applies as printed.
    """
    # What torch.ops.vcreg.fused runs, without its round trip through the dispatcher (about 90 us
    # with cold caches, 5 us with warm ones).
    return _ops.vcreg_function(x, Params.of(alpha, beta, eps, gamma, delta), dim, scale=scale)


class VCReg(nn.Module):
    """A VCReg layer: ``VCReg(alpha, beta, dim=1)(h)`` returns h and regularises it in the backward.

    Use ``dim=1`` after convolutional blocks (NCHW or channels_last), ``dim=-1`` after
    transformer blocks ((batch, tokens, features)); ``dim=None`` picks 1 for inputs of rank 4 or
    more and -1 otherwise. In eval mode it does nothing.

    ``terms`` (a non-persistent buffer): tensor([l_var, l_cov]), unweighted, of the last backward
    through this layer, on the device (NaN until then, and after ``reset_terms``). The backward
    writes it from the statistics it computes anyway: no extra pass over h, no host sync.

    ``sync=True``: the statistics are those of the whole batch over ``process_group`` (None: the
    default group), like SyncBatchNorm; for use under DDP, which averages gradients (see
    ``vcreg_kernels.distributed`` for the scaling). Each rank's own batch may then hold 0 or 1
    samples as long as the group's holds 2. Without an initialised process group it regularises
    the local batch.

    ``scale="paper"``: beta * (n - 1) is the covariance coefficient, n the sample count at this
    layer (the group's in the cross-rank mode): the paper's alpha/beta grid as printed (``vcreg``).
    """

    def __init__(
        self,
        alpha: float = 0.16,
        beta: float = 0.01,
        eps: float = 1e-4,
        gamma: float = 1.0,
        delta: Optional[float] = None,
        dim: Optional[int] = -1,
        sync: bool = False,
        process_group=None,
        scale: str = "exact",
    ) -> None:
        super().__init__()
        check_scale(scale)
        self.alpha, self.beta, self.eps, self.gamma, self.delta, self.dim = alpha, beta, eps, gamma, delta, dim
        self.scale = scale
        self.set_sync(sync, process_group)
        self.register_buffer("terms", torch.full((2,), float("nan")), persistent=False)

    def set_sync(self, sync: bool = True, process_group=None) -> None:
        """Turn the cross-rank mode on (over ``process_group``, None: the default group) or off."""
        self.sync, self.process_group = sync, process_group
        self._group = group_key(process_group) if sync else None  # a string, for the op's schema

    def reset_terms(self) -> None:
        self.terms.fill_(float("nan"))

    def feature_dim(self, x: torch.Tensor) -> int:
        """The feature dimension this layer uses for ``x``."""
        return self.dim if self.dim is not None else (1 if x.dim() >= 4 else -1)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # model.half() / .to(bfloat16) cast floating buffers; the logged terms stay float32.
        if self.terms.dtype != torch.float32:
            self.terms = self.terms.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        params = Params(self.alpha, self.beta, self.eps, self.gamma, self.delta)
        return _ops.vcreg_function(x, params, self.feature_dim(x), self.terms, self._group, self.scale)

    def extra_repr(self) -> str:
        sync = f", sync=True, process_group={self.process_group}" if self.sync else ""
        scale = f", scale={self.scale!r}" if self.scale != "exact" else ""
        return (f"alpha={self.alpha}, beta={self.beta}, eps={self.eps}, gamma={self.gamma}, "
                f"delta={self.delta}, dim={self.dim}{sync}{scale}")
