"""The cuda backend's build (csrc/cuda/). Its kernels are tested with every backend's in
test_kernels.py (on a GPU) and through the op in test_backends.py.

On a machine without a GPU this checks the registration: a build with FORCE_CUDA=1 must have
registered the CUDA kernels of all five ops, and CI sets VCREG_EXPECT_CUDA=1 so that a build that
silently came out CPU-only fails here.
"""
import os

import pytest
import torch

from vcreg_kernels import _extension

OPS = ("backward_kernel", "stats_kernel", "apply_kernel", "pair_stats_kernel", "pair_apply_kernel")


def _has_cuda_kernel(op: str) -> bool:
    return _extension.load() and torch._C._dispatch_has_kernel_for_dispatch_key(f"vcreg::{op}", "CUDA")


@pytest.mark.skipif(os.environ.get("VCREG_EXPECT_CUDA", "0") != "1" and not torch.cuda.is_available(),
                    reason="a CPU-only machine that was not asked to build the CUDA kernels (VCREG_EXPECT_CUDA=1)")
def test_cuda_kernels_registered():
    assert _extension.load(), "vcreg_kernels._C does not import"
    missing = [op for op in OPS if not _has_cuda_kernel(op)]
    assert not missing, f"vcreg_kernels._C has no CUDA kernel for {missing} (built without FORCE_CUDA=1?)"
