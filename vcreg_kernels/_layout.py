"""How an activation reaches the kernels: its layout, decided once per call for every backend.

Every backend works on a canonical tensor ``x3`` of shape (B, d, L), contiguous, whose samples
are the (b, l) pairs, so X (n x d, n = B*L) of SPEC section 2 is
``x3.permute(0, 2, 1).reshape(n, d)``. There are two canonical layouts, told apart by L alone:

* rows (L == 1): x3 is X itself, row-major (n, d), strides (d, 1, 1): ``(..., d)`` contiguous
  with dim=-1, or channels_last with dim=1 (the feature axis innermost);
* bdl (L > 1): B = prod(shape[:dim]), L = prod(shape[dim+1:]), strides (d*L, L, 1): a contiguous
  tensor whose feature axis is not innermost, NCHW with dim=1; slab b of x3 is X_b^T.

``choose`` looks at x once (as aten's ``batch_norm_choose_impl`` does for BatchNorm) and returns
a ``Layout``: which of the two, and how x3 is made from x:

* a view of x, no copy: the fast paths of SPEC section 5;
* a contiguous copy, for any other strides;
* a row-major copy (x with its feature axis moved last) where a bdl tensor's d*L passes 2^31 - 1,
  so that no kernel's int32 offsets within a sample plane overflow.

``canonical`` makes x3 (and grad_y's gy3, in the same layout), ``restore`` gives grad_x x's
shape and strides: the only code that does. Backends assert their inputs with ``check_canonical``
(the compiled kernels with its C++ twin in csrc/vcreg_common.h) and never re-derive the layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Layout:
    """The canonical layout of x along ``dim``, and how x3 is made from x."""

    B: int
    d: int
    L: int
    dim: int
    moved: bool  # x3 holds x with its feature axis moved last (so L == 1)
    copied: bool  # x3 is a copy of x: x's own strides are not a fast path

    @property
    def rows(self) -> bool:
        return self.L == 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.B, self.d, self.L)


def choose(x: torch.Tensor, dim: int) -> Layout:
    """The layout of ``x`` along ``dim`` (already normalised to 0 <= dim < x.dim())."""
    d = x.shape[dim]
    n = x.numel() // d if d else 0
    if x.movedim(dim, -1).is_contiguous():
        return Layout(n, d, 1, dim, moved=True, copied=False)
    B = math.prod(x.shape[:dim])
    L = math.prod(x.shape[dim + 1 :])
    if d * L > INT32_MAX:
        return Layout(n, d, 1, dim, moved=True, copied=True)
    return Layout(B, d, L, dim, moved=False, copied=not x.is_contiguous())


def canonical(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The canonical (B, d, L) tensor of ``t`` (x, or anything of x's shape) in ``layout``;
    a view where ``t``'s strides allow it, else a copy."""
    if layout.moved:
        return t.movedim(layout.dim, -1).contiguous().view(layout.shape)
    return t.contiguous().view(layout.shape)


def restore(g3: torch.Tensor, layout: Layout, x: torch.Tensor) -> torch.Tensor:
    """``g3`` (canonical, in ``layout``) as a tensor of x's shape and, where x is dense, x's strides."""
    if layout.moved:
        g = g3.view(x.movedim(layout.dim, -1).shape).movedim(-1, layout.dim)
    else:
        g = g3.view(x.shape)
    if layout.copied:
        g = torch.empty_like(x, dtype=g3.dtype).copy_(g)
    return g


def check_canonical(x3: torch.Tensor, gy3: Optional[torch.Tensor] = None, min_samples: int = 1) -> None:
    """What every backend's halves assert of their inputs (the messages of csrc/vcreg_common.h)."""
    if x3.dim() != 3 or not x3.is_contiguous():
        raise RuntimeError(f"vcreg: x must be a contiguous canonical (B, d, L) tensor, got shape "
                           f"{tuple(x3.shape)} and strides {x3.stride()}")
    if not x3.is_floating_point():
        raise RuntimeError(f"vcreg: x must be floating point, got {x3.dtype}")
    B, d, L = x3.shape
    if d < 1:
        raise ValueError(f"vcreg: x has no features (d = 0), shape {tuple(x3.shape)}")
    if B * L < min_samples:
        raise ValueError(f"vcreg: needs at least {min_samples} samples, got n = {B * L} for a (B, d, L) "
                         f"tensor of shape {tuple(x3.shape)}")
    if L > 1 and d * L > INT32_MAX:
        raise RuntimeError(f"vcreg: a bdl tensor of shape {tuple(x3.shape)} has d*L past 2^31 - 1: "
                           "the rows layout serves it")
    if gy3 is not None:
        if gy3.shape != x3.shape:
            raise RuntimeError(f"vcreg: grad_y has shape {tuple(gy3.shape)}, x has {tuple(x3.shape)}")
        if gy3.device != x3.device:
            raise RuntimeError(f"vcreg: grad_y is on {gy3.device}, x on {x3.device}")
        if not gy3.is_floating_point():
            raise RuntimeError(f"vcreg: grad_y must be floating point, got {gy3.dtype}")
        if not gy3.is_contiguous():
            raise RuntimeError(f"vcreg: grad_y must be contiguous like x (canonical), got strides {gy3.stride()}")


def check_apply_operands(x3: torch.Tensor, G: torch.Tensor, mu: torch.Tensor) -> None:
    d = x3.shape[1]
    if G.shape != (d, d):
        raise RuntimeError(f"vcreg: G must be (d, d) = ({d}, {d}), got {tuple(G.shape)}")
    if mu.shape != (d,):
        raise RuntimeError(f"vcreg: mu must be (d,) = ({d},), got {tuple(mu.shape)}")
    if not (G.is_floating_point() and mu.is_floating_point()):
        raise RuntimeError(f"vcreg: G and mu must be floating point, got {G.dtype} and {mu.dtype}")
    if G.device != x3.device or mu.device != x3.device:
        raise RuntimeError(f"vcreg: G and mu must be on {x3.device}")
