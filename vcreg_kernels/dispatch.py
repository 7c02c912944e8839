"""Which backend runs: the one place that decides (SPEC section 4).

Every backend has the same host signature and computes SPEC section 2 on canonical views
(see ``_layout``)::

    vcreg_backward_<name>(gy3, x3, alpha, beta, eps, gamma, delta) -> (grad_x3, terms)

with ``x3``, ``gy3`` of shape (B, d, L), ``grad_x3`` in x3's strides and grad_y's dtype, and
``terms = tensor([l_var, l_cov])`` (unweighted, accumulate dtype) for logging; and its two halves,
for the cross-rank mode (``distributed.py``), which all-reduces the statistics between them::

    vcreg_stats_<name>(x3) -> (mu, M2 = Xc^T Xc)                    (accumulate dtype)
    vcreg_apply_<name>(gy3, x3, G, mu) -> grad_y + (X - mu) @ G     (x3's strides, grad_y's dtype)

| backend   | tensors                                   | code                          |
| --------- | ----------------------------------------- | ----------------------------- |
| triton    | CUDA/ROCm; CPU only under TRITON_INTERPRET=1 | vcreg_kernels/triton_kernels.py |
| cuda      | CUDA/ROCm                                 | csrc/cuda/ via vcreg::backward_kernel |
| cpu       | CPU                                       | csrc/vcreg_cpu.cpp via vcreg::backward_kernel |
| reference | any                                       | vcreg_kernels/reference.py    |

``auto`` (the default, or the environment variable ``VCREG_BACKEND``): a GPU tensor goes to
cuda if built, else triton if it imports, else reference with one warning; a CPU tensor to cpu
if built, else reference with one warning. (cuda comes first on a GPU because it was the faster
of the two at every layer shape and dtype measured, bench/results/nvidia-h100-80gb-hbm3/.)
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable, Optional

import torch

from . import _extension, _layout
from .distributed import vcreg_backward_sync
from .reference import vcreg_apply_reference, vcreg_backward_reference, vcreg_stats_reference

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

_backend = os.environ.get("VCREG_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"VCREG_BACKEND={_backend!r} is not one of {BACKENDS}")
_warned: set[str] = set()


def set_backend(name: str) -> None:
    """Choose the backend for every later call: one of ``BACKENDS``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"vcreg backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _why_unavailable(name: str, device_type: str) -> Optional[str]:
    """None if backend ``name`` can run on ``device_type`` here, else what is missing."""
    gpu = device_type == "cuda"
    if name == "reference":
        return None
    if name == "triton":
        if not triton_importable():
            return "the triton package is not importable"
        if not gpu and not (device_type == "cpu" and _triton_interpret()):
            return f"triton runs on {device_type} tensors only under TRITON_INTERPRET=1 (CPU) or on a GPU"
        return None
    if name in ("cpu", "cuda"):
        if name == "cpu" and device_type != "cpu":
            return f"the cpu backend takes CPU tensors, got a {device_type} tensor"
        if name == "cuda" and not gpu:
            return f"the cuda backend takes CUDA tensors, got a {device_type} tensor"
        if not _extension.has_kernel(name):
            return (
                f"the compiled extension vcreg_kernels._C has no {name.upper()} kernel "
                "(build it with `pip install --no-build-isolation -e .`"
                + (", with FORCE_CUDA=1 and a CUDA toolkit for the cuda backend)" if name == "cuda" else ")")
            )
        return None
    raise ValueError(name)


def available_backends(device_type: str) -> list[str]:
    """The backends (not "auto") that can run on tensors of ``device_type`` on this machine."""
    return [b for b in BACKENDS[1:] if _why_unavailable(b, device_type) is None]


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def resolve_backend(x: torch.Tensor, name: Optional[str] = None) -> str:
    """The backend that runs for ``x``: the dispatch rule of SPEC section 4."""
    name = name or _backend
    device_type = x.device.type
    if name != "auto":
        why = _why_unavailable(name, device_type)
        if why is not None:
            raise RuntimeError(f"vcreg backend {name!r} is unavailable: {why}")
        return name
    if device_type == "cuda":
        for candidate in ("cuda", "triton"):
            if _why_unavailable(candidate, device_type) is None:
                return candidate
        _warn_once("vcreg: neither the compiled CUDA extension nor triton is available; using the slow reference backend")
    elif device_type == "cpu":
        if _why_unavailable("cpu", device_type) is None:
            return "cpu"
        _warn_once("vcreg: the compiled CPU extension is not built; using the slow reference backend")
    return "reference"


def _compiled_kernel(gy3, x3, alpha, beta, eps, gamma, delta):
    return torch.ops.vcreg.backward_kernel(gy3, x3, alpha, beta, eps, gamma, delta)


def _triton_kernel(gy3, x3, alpha, beta, eps, gamma, delta):
    from .triton_kernels import vcreg_backward_triton

    return vcreg_backward_triton(gy3, x3, alpha, beta, eps, gamma, delta)


def _compiled_stats(x3):
    return torch.ops.vcreg.stats_kernel(x3)


def _compiled_apply(gy3, x3, G, mu):
    return torch.ops.vcreg.apply_kernel(gy3, x3, G, mu)


def _triton_stats(x3):
    from .triton_kernels import vcreg_stats_triton

    return vcreg_stats_triton(x3)


def _triton_apply(gy3, x3, G, mu):
    from .triton_kernels import vcreg_apply_triton

    return vcreg_apply_triton(gy3, x3, G, mu)


_IMPLEMENTATIONS: dict[str, Callable] = {
    "triton": _triton_kernel,
    "cuda": _compiled_kernel,  # csrc/cuda: vcreg_backward_cuda, the CUDA key of vcreg::backward_kernel
    "cpu": _compiled_kernel,  # csrc/vcreg_cpu.cpp: vcreg_backward_cpu, the CPU key
    "reference": vcreg_backward_reference,
}
# The halves (stats, apply) of each backend, for the cross-rank mode.
_HALVES: dict[str, tuple[Callable, Callable]] = {
    "triton": (_triton_stats, _triton_apply),
    "cuda": (_compiled_stats, _compiled_apply),  # vcreg::stats_kernel / apply_kernel, CUDA key
    "cpu": (_compiled_stats, _compiled_apply),  # the CPU key
    "reference": (vcreg_stats_reference, vcreg_apply_reference),
}


def vcreg_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    beta: float,
    eps: float,
    gamma: float,
    delta: Optional[float],
    dim: int,
    backend: Optional[str] = None,
    group: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x = grad_y + d(loss)/dx and tensor([l_var, l_cov]), on the backend of ``resolve_backend``.

    ``dim`` must already be normalised. grad_x has x's layout where x is dense, grad_y's dtype.
    With ``group`` (a ``distributed.group_key``) the statistics are those of the whole process
    group's batch: the backend's halves around the all-reduces of ``distributed.py``.
    """
    name = resolve_backend(x, backend)
    if group is None:
        impl = _IMPLEMENTATIONS[name]
    else:
        stats, apply = _HALVES[name]
        impl = functools.partial(vcreg_backward_sync, group=group, stats=stats, apply=apply)
    canon = _layout.canonical_view(x, dim)
    gy3 = _layout.same_layout(grad_y, canon, dim)
    g3, terms = impl(gy3, canon.x3, float(alpha), float(beta), float(eps), float(gamma),
                     None if delta is None else float(delta))
    grad_x = _layout.restore(g3, canon, x, dim)
    if canon.copied:  # keep x's own layout, as the fake implementation promises
        grad_x = torch.empty_like(x, dtype=grad_y.dtype).copy_(grad_x)
    return grad_x, terms
