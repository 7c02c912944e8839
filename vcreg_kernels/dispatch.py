"""Which backend runs: the one place that decides (SPEC section 4), and what a backend is.

A backend is one ``Backend`` record. Its halves work on canonical (B, d, L) tensors (``_layout``;
they assert them, never re-derive them)::

    stats(x3) -> (mu, M2 = Xc^T Xc)                                 accumulate dtype
    apply(gy3, x3, G, mu) -> grad_y + (X - mu) @ G                  canonical, grad_y's dtype
    backward(gy3, x3, params) -> (grad_y + Xc @ G, [l_var, l_cov])  optional: one fused pass

and, for the VICReg loss (``vicreg.py``) on two branches za3, zb3 of one shape and layout::

    pair_stats(za3, zb3) -> (mu_a, M2_a, mu_b, M2_b, sum (Z_a - Z_b)^2)      optional: one pass over both
    pair_apply(g, za3, zb3, G_a, mu_a, G_b, mu_b, c) -> (grad_a3, grad_b3)     optional: one pass writing both
        grad_a3 = g (c (Z_a - Z_b) + (Z_a - mu_a) @ G_a), likewise b with c (Z_b - Z_a); g, c 0-dim tensors

With no fused ``backward`` the halves are composed around ``reference.gradient_matrix``; the
cross-rank mode (``distributed.py``) always composes them, all-reducing the statistics between.
With no pair kernels they are composed too (``reference.pair_stats_of_halves``,
``pair_apply_of_halves``). Every backend has its own: the cpu and cuda backends
``vcreg::pair_stats_kernel`` and ``vcreg::pair_apply_kernel`` under the CPU and CUDA keys, the
triton backend ``vicreg_pair_stats_triton`` and ``vicreg_pair_apply_triton`` (the invariance sum
without a temporary, one launch writing both gradients), the reference its formula in torch ops.
A backend keeps a fused kernel only where it is faster than that composition.

| backend   | tensors                                      | code                                    |
| --------- | -------------------------------------------- | --------------------------------------- |
| cuda      | CUDA/ROCm                                    | csrc/cuda/, the CUDA key of vcreg::*_kernel |
| triton    | CUDA/ROCm; CPU only under TRITON_INTERPRET=1 | vcreg_kernels/triton_kernels/           |
| cpu       | CPU                                          | csrc/vcreg_cpu.cpp, the CPU key         |
| reference | any                                          | vcreg_kernels/reference.py              |

``auto`` (the default, or the environment variable ``VCREG_BACKEND``): a GPU tensor goes to
cuda if built, else triton if it imports, else reference with one warning; a CPU tensor to cpu
if built, else reference with one warning. (cuda comes first on a GPU because it was the faster
of the two at every layer shape and dtype measured, bench/results/nvidia-h100-80gb-hbm3/.)
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _extension, _layout
from ._params import Params
from .distributed import vcreg_backward_sync
from .reference import (backward_of_halves, pair_apply_of_halves, pair_stats_of_halves, vcreg_apply_reference,
                        vcreg_stats_reference, vicreg_pair_apply_reference, vicreg_pair_stats_reference)

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

_backend = os.environ.get("VCREG_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"VCREG_BACKEND={_backend!r} is not one of {BACKENDS}")
_warned: set[str] = set()
# The settings under which CPU tensors take the cpu backend (where it is built).
_CPU_SETTINGS = ("auto", "cpu")
# Whether the setting is one of them, as a 0-dim tensor: the C++ autograd node of a CPU layer
# (_ops.vcreg_function) reads it in its backward, so that a set_backend between a layer's forward
# and its backward takes effect there too.
_cpu_flag = torch.tensor(_backend in _CPU_SETTINGS)


def set_backend(name: str) -> None:
    """Choose the backend for every later call: one of ``BACKENDS``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"vcreg backend must be one of {BACKENDS}, got {name!r}")
    _backend = name
    _cpu_flag.fill_(name in _CPU_SETTINGS)


def get_backend() -> str:
    return _backend


@dataclass(frozen=True)
class Backend:
    """One backend: its name, whether it runs here, and its kernels (see the module docstring)."""

    name: str
    unavailable: Callable[[str], Optional[str]]  # device type -> what is missing, None if it runs
    stats: Callable
    apply: Callable
    backward: Optional[Callable] = None
    pair_stats: Optional[Callable] = None
    pair_apply: Optional[Callable] = None

    def run_backward(self, gy3: torch.Tensor, x3: torch.Tensor, params: Params):
        if self.backward is not None:
            return self.backward(gy3, x3, params)
        return backward_of_halves(self.stats, self.apply, gy3, x3, params)

    def run_pair_stats(self, za3: torch.Tensor, zb3: torch.Tensor):
        if self.pair_stats is not None:
            return self.pair_stats(za3, zb3)
        return pair_stats_of_halves(self.stats, za3, zb3)

    def run_pair_apply(self, *args):
        if self.pair_apply is not None:
            return self.pair_apply(*args)
        return pair_apply_of_halves(self.apply, *args)


def _lazy(module: str, name: str) -> Callable:
    """``module.name``, imported when first called (triton is imported only if its backend runs)."""

    def call(*args):
        return getattr(importlib.import_module(module, __package__), name)(*args)

    call.__qualname__ = f"{module.lstrip('.')}.{name}"
    return call


@functools.cache
def triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_unavailable(device_type: str) -> Optional[str]:
    if not triton_importable():
        return "the triton package is not importable"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type != "cuda" and not (device_type == "cpu" and interpreting):
        return f"triton runs on {device_type} tensors only under TRITON_INTERPRET=1 (CPU) or on a GPU"
    return None


def _compiled_unavailable(key: str) -> Callable[[str], Optional[str]]:
    def why(device_type: str) -> Optional[str]:
        if device_type != key:
            return f"the {key} backend takes {key.upper()} tensors, got a {device_type} tensor"
        if not _extension.has_kernel(key):
            return (
                f"the compiled extension vcreg_kernels._C has no {key.upper()} kernel "
                "(build it with `pip install --no-build-isolation -e .`"
                + (", with FORCE_CUDA=1 and a CUDA toolkit for the cuda backend)" if key == "cuda" else ")")
            )
        return None

    return why


def _compiled_backward(gy3: torch.Tensor, x3: torch.Tensor, params: Params):
    return torch.ops.vcreg.backward_kernel(gy3, x3, *params.values())


def _compiled_pair_stats(za3: torch.Tensor, zb3: torch.Tensor):
    return torch.ops.vcreg.pair_stats_kernel(za3, zb3)


def _compiled_pair_apply(g, za3, zb3, G_a, mu_a, G_b, mu_b, c):
    return torch.ops.vcreg.pair_apply_kernel(g, za3, zb3, G_a, mu_a, G_b, mu_b, c)


def _compiled(key: str, pairs: bool = False) -> Backend:
    # vcreg::*_kernel, whose CPU and CUDA kernels register under their dispatch keys (csrc/). Looked
    # up at call time: _ops defines the schemas after importing this module. ``pairs``: the key has
    # the VICReg pair kernels (both keys do: csrc/vcreg_cpu.cpp, csrc/cuda/vcreg_cuda.cu).
    return Backend(key, _compiled_unavailable(key), lambda x3: torch.ops.vcreg.stats_kernel(x3),
                   lambda gy3, x3, G, mu: torch.ops.vcreg.apply_kernel(gy3, x3, G, mu), _compiled_backward,
                   pair_stats=_compiled_pair_stats if pairs else None,
                   pair_apply=_compiled_pair_apply if pairs else None)


_RECORDS: dict[str, Backend] = {
    "triton": Backend("triton", _triton_unavailable, _lazy(".triton_kernels", "vcreg_stats_triton"),
                      _lazy(".triton_kernels", "vcreg_apply_triton"), _lazy(".triton_kernels", "vcreg_backward_triton"),
                      pair_stats=_lazy(".triton_kernels", "vicreg_pair_stats_triton"),
                      pair_apply=_lazy(".triton_kernels", "vicreg_pair_apply_triton")),
    "cuda": _compiled("cuda", pairs=True),
    "cpu": _compiled("cpu", pairs=True),
    "reference": Backend("reference", lambda device_type: None, vcreg_stats_reference, vcreg_apply_reference,
                         pair_stats=vicreg_pair_stats_reference, pair_apply=vicreg_pair_apply_reference),
}


def backend(name: str) -> Backend:
    """The record of backend ``name`` (not "auto")."""
    return _RECORDS[name]


def available_backends(device_type: str) -> list[str]:
    """The backends (not "auto") that can run on tensors of ``device_type`` on this machine."""
    return [b for b in BACKENDS[1:] if _RECORDS[b].unavailable(device_type) is None]


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def resolve_backend(x: torch.Tensor, name: Optional[str] = None) -> str:
    """The backend that runs for ``x``: the dispatch rule of SPEC section 4."""
    name = name or _backend
    device_type = x.device.type
    if name != "auto":
        why = _RECORDS[name].unavailable(device_type)
        if why is not None:
            raise RuntimeError(f"vcreg backend {name!r} is unavailable: {why}")
        return name
    if device_type == "cuda":
        for candidate in ("cuda", "triton"):
            if _RECORDS[candidate].unavailable(device_type) is None:
                return candidate
        _warn_once("vcreg: neither the compiled CUDA extension nor triton is available; using the slow reference backend")
    elif device_type == "cpu":
        if _RECORDS["cpu"].unavailable(device_type) is None:
            return "cpu"
        _warn_once("vcreg: the compiled CPU extension is not built; using the slow reference backend")
    return "reference"


def cpu_kernel_runs() -> bool:
    """Whether ``resolve_backend`` picks the compiled cpu backend for CPU tensors (it does not raise
    where a forced backend is unavailable: that is the backward's error)."""
    return _backend in _CPU_SETTINGS and _RECORDS["cpu"].unavailable("cpu") is None


def cpu_kernel_flag() -> torch.Tensor:
    """The 0-dim bool tensor that says whether the setting lets the cpu backend run, kept by ``set_backend``."""
    return _cpu_flag


def vcreg_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    params: Params,
    dim: int,
    backend_name: Optional[str] = None,
    group: Optional[str] = None,
    scale: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_x = grad_y + d(loss)/dx and tensor([l_var, l_cov]), on the backend of ``resolve_backend``.

    ``dim`` must already be normalised. grad_x has x's layout where x is dense, grad_y's dtype.
    With ``group`` (a ``distributed.group_key``) the statistics are those of the whole process
    group's batch: the backend's halves around the all-reduces of ``distributed.py``.
    ``scale="paper"``: beta * (n - 1) is the covariance coefficient (n: the group's, with ``group``).
    """
    record = _RECORDS[resolve_backend(x, backend_name)]
    layout = _layout.choose(x, dim)
    x3 = _layout.canonical(x, layout)
    gy3 = _layout.canonical(grad_y, layout)
    if group is None:
        if scale == "paper":
            params = dataclasses.replace(params, beta=params.beta * (layout.B * layout.L - 1))
        g3, terms = record.run_backward(gy3, x3, params)
    else:
        g3, terms = vcreg_backward_sync(gy3, x3, params, group=group, stats=record.stats, apply=record.apply,
                                        paper=scale == "paper")
    return _layout.restore(g3, layout, x), terms
