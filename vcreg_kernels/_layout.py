"""Canonical (B, d, L) views of an activation, shared by every backend.

Every backend works on a 3-D view ``x3`` of shape (B, d, L) whose samples are the
(b, l) pairs, so X (n x d, n = B*L) of SPEC section 2 is ``x3.permute(0, 2, 1).reshape(n, d)``.
Two memory layouts reach the kernels without a copy:

* ``"rows"``: the feature axis is innermost (``(..., d)`` contiguous with dim=-1, or
  channels_last with dim=1). Then L == 1 and X is a plain row-major (n, d) matrix:
  x3 has strides (d, 1, 1).
* ``"bdl"``: the tensor is contiguous and the feature axis is not innermost (NCHW with
  dim=1): B = prod(shape[:dim]), L = prod(shape[dim+1:]), strides (d*L, L, 1).

Anything else (arbitrary strides, non-dense views) is copied to the "bdl" layout first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Canonical:
    x3: torch.Tensor  # (B, d, L) view of x, or of a contiguous copy of x
    mode: str  # "rows" or "bdl"
    copied: bool  # True when x had to be copied to reach a fast layout


def canonical_view(x: torch.Tensor, dim: int) -> Canonical:
    """The (B, d, L) view of ``x`` along ``dim`` (already normalised to 0 <= dim < x.dim())."""
    d = x.shape[dim]
    moved = x.movedim(dim, -1)
    if moved.is_contiguous():
        return Canonical(moved.view(-1, d, 1), "rows", False)
    b = math.prod(x.shape[:dim])
    l = math.prod(x.shape[dim + 1 :])
    if x.is_contiguous():
        return Canonical(x.view(b, d, l), "bdl", False)
    return Canonical(x.contiguous().view(b, d, l), "bdl", True)


def same_layout(t: torch.Tensor, like: Canonical, dim: int) -> torch.Tensor:
    """The (B, d, L) view of ``t`` (same shape as x) in ``like``'s layout, copying if needed."""
    d = t.shape[dim]
    if like.mode == "rows":
        moved = t.movedim(dim, -1)
        return moved.contiguous().view(-1, d, 1)
    return t.contiguous().view(like.x3.shape)


def restore(g3: torch.Tensor, like: Canonical, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Undo ``canonical_view``: ``g3`` (in ``like``'s layout) back to x's shape."""
    if like.mode == "rows":
        moved_shape = x.movedim(dim, -1).shape
        return g3.view(moved_shape).movedim(-1, dim)
    return g3.view(x.shape)
