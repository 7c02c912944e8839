"""Loading the compiled extension (csrc/), once. Its absence is logged, never an ImportError."""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("vcreg_kernels")


@functools.cache
def load() -> bool:
    """Import ``vcreg_kernels._C`` (registers the C++/CUDA kernels); False if it is not built."""
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        log.info("vcreg_kernels: compiled extension not available (%s); using the reference backend", e)
        return False
    return True


@functools.cache
def has_kernel(device_type: str) -> bool:
    """Whether the compiled ``vcreg::backward_kernel`` has a kernel for ``device_type`` ("cpu", "cuda")."""
    if not load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("vcreg::backward_kernel", key)
