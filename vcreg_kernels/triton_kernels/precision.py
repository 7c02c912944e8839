"""Precision of the matrix products (SPEC section 2's table), decided here and nowhere else.

The mode is read when the backward runs, from torch's own setting, as torch's matmuls read it:

| x         | torch setting        | mode     | products                                              |
| --------- | -------------------- | -------- | ----------------------------------------------------- |
| float32   | "highest" / "ieee"   | "bf16x3" | y = hi + lo (bfloat16 each), hi*hi + hi*lo + lo*hi     |
|           |                      |          | on one float32 accumulator: float32-accurate          |
| float32   | "high" / "tf32"      | "tf32"   | operands rounded to nearest TF32 (bf16x3 on gfx90a,   |
|           |                      |          | which has no TF32)                                    |
| float32   | "medium"             | "bf16"   | bfloat16 operands                                     |
| bfloat16  | any                  | "bf16"   | the input's own type                                  |
| float16   | any                  | "fp16"   | the input's own type, G scaled by a power of two      |
| float64   | any                  | "fp64"   | float64 on the FMA units                              |

Targets without matrix units (gfx900, gfx906) and NVIDIA before sm_80 compute every 32-bit and
16-bit mode as "ieee" (float32 FMA: exact products, and splitting would only triple the work).
The x3 split is by hand (split once per tile, three tl.dot on one accumulator) on every target
with matrix units: on NVIDIA bf16 products run at twice TF32's rate, and on AMD (MI200, MI300) at
8x the native float32 MFMA rate, so bf16x3 is the fastest float32-accurate product everywhere.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

SETTINGS = ("highest", "high", "medium")
MODES = ("ieee", "tf32", "bf16x3", "bf16", "fp16", "fp64")
_NO_MATRIX_UNITS = ("gfx900", "gfx906")
_HIP_TF32 = ("gfx940", "gfx941", "gfx942")  # xf32 MFMA: gfx90a and gfx950 have none


def float32_matmul_setting() -> str:
    """torch's float32 matmul precision now: "highest", "high" or "medium".

    ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" / "tf32", what torch's CUDA matmuls
    read) decides where it is set; "tf32" is "medium" when
    ``torch.set_float32_matmul_precision("medium")`` said so, else "high". Where it is unset (or
    absent, before torch 2.9), ``torch.get_float32_matmul_precision()``; torch raises there when the
    legacy and new APIs were mixed, and then ``allow_tf32`` tells TF32 from full float32."""
    fp32 = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    if fp32 == "ieee":
        return "highest"
    if fp32 == "tf32":
        return "medium" if legacy == "medium" else "high"
    if legacy is not None:
        return legacy
    try:
        return "high" if torch.backends.cuda.matmul.allow_tf32 else "highest"
    except RuntimeError:
        return "highest"


@contextlib.contextmanager
def matmul_precision(setting: str) -> Iterator[None]:
    """torch's float32 matmul precision set to ``setting`` ("highest", "high", "medium") within;
    afterwards both of torch's APIs as they were (``torch.backends.cuda.matmul.fp32_precision``
    too, where it exists: a test may have set it directly)."""
    fp32 = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    legacy = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        if fp32 is not None:
            torch.backends.cuda.matmul.fp32_precision = fp32


def has_matrix_units(target: Optional[tuple]) -> bool:
    if target is None:
        return True  # the interpreter emulates the GPU's products
    backend, arch = target
    if backend == "hip":
        return str(arch) not in _NO_MATRIX_UNITS
    return int(arch) >= 80


def precision_mode(dtype: torch.dtype, target: Optional[tuple], setting: Optional[str] = None) -> str:
    """The product mode for x of ``dtype`` on ``target`` ((backend, arch) as in triton's GPUTarget;
    None: the interpreter, which emulates the GPU's rounding) under torch's ``setting`` (default:
    the current one)."""
    if dtype == torch.float64:
        return "fp64"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"vcreg triton backend: unsupported dtype {dtype}")
    if not has_matrix_units(target):
        return "ieee"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    setting = setting or float32_matmul_setting()
    if setting == "medium":
        return "bf16"
    if setting == "high" and (target is None or target[0] == "cuda" or str(target[1]) in _HIP_TF32):
        return "tf32"
    return "bf16x3"
