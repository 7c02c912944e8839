"""What only the cpu backend has (csrc/vcreg_cpu.cpp): its plans, chosen by n, d and delta,
results independent of the thread count, and scratch memory kept between calls. Its kernels are
tested with every backend's in test_kernels.py and through the op in test_backends.py.
"""
import os

import pytest
import torch

from conftest import assert_within, dtype_id, floor_scale, make_x3, rel_err
from vcreg_kernels import _extension
from vcreg_kernels._params import Params
from vcreg_kernels.reference import vcreg_backward_reference, vcreg_stats_reference

# Only a build that opted out of the extension may go without these kernels: anywhere else a
# missing CPU kernel must fail these tests, not skip them.
pytestmark = pytest.mark.skipif(
    os.environ.get("VCREG_NO_EXTENSION") == "1" and not _extension.has_kernel("cpu"),
    reason="built with VCREG_NO_EXTENSION=1",
)

# (B, d, L) that reach every plan: per-task sample ranges ("grouped", d < 128 with large n:
# 8195 x 3, 8 x 96 x 1300), one centred panel of every sample ("panel": d = 257 with tiles of uneven
# width, sample counts that leave remainders in every block, bdl runs across slab boundaries, a
# 12000-sample panel), and the backward's "dual" plan (delta None and n <= d: products with
# Xc Xc^T) in each layout; with a delta those take the panel plan.
SPLITS = [(1031, 257, 1), (8195, 3, 1), (3000, 96, 1), (3, 257, 37), (5, 96, 613), (16, 130, 49), (8, 96, 1300),
          (4, 160, 3000), (150, 300, 1), (3, 300, 49), (7, 1100, 37)]


def split_id(size):
    return ("rows-" if size[2] == 1 else "bdl-") + "x".join(map(str, size))


@pytest.mark.parametrize("size", SPLITS, ids=split_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("mean", [0.0, 1000.0])
@pytest.mark.parametrize("delta,gamma", [(None, 4.0), (0.05, 1.5)])
def test_work_splits(size, dtype, mean, delta, gamma):
    x3 = make_x3(*size, dtype, mean)
    fs = floor_scale(x3, dtype)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    _, M2_pt = vcreg_stats_reference(x3)
    assert torch.equal(M2, M2.T)
    assert_within(rel_err(M2, M2_ref), rel_err(M2_pt, M2_ref), "cpu", dtype, "cpu", "M2", fs)
    params = Params(0.7, 0.3, 1e-4, gamma, delta)
    reg, terms_ref = vcreg_backward_reference(torch.zeros_like(x3, dtype=torch.float64), x3.double(), params)
    gy3 = (torch.randn(x3.shape, dtype=torch.float64) * reg.std()).to(dtype)
    gx, terms = torch.ops.vcreg.backward_kernel(gy3, x3, *params.values())
    ref, _ = vcreg_backward_reference(gy3.double(), x3.double(), params)
    plain, _ = vcreg_backward_reference(gy3, x3, params)
    scale = reg.norm().item()
    assert_within(rel_err(gx, ref, scale), rel_err(plain, ref, scale), "cpu", dtype, "cpu", "grad_x", fs)
    assert torch.allclose(terms.double(), terms_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("size", [(30000, 300, 1), (12, 300, 2500)], ids=split_id)
def test_stats_across_super_panels(size):
    # d > 256 and n * d * 4 bytes = 36 MB, past the 32 MiB panel, take the streamed plan: five
    # 8 MiB super-panels whose float64 sums are merged.
    x3 = make_x3(*size, torch.float32, mean=300.0)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    mu_pt, M2_pt = vcreg_stats_reference(x3)
    assert (mu.double() - mu_ref).abs().max() <= 4 * (mu_pt.double() - mu_ref).abs().max() + 1e-6
    assert_within(rel_err(M2, M2_ref), rel_err(M2_pt, M2_ref), "cpu", torch.float32, "cpu", "M2")


PLANS = {"rows-grouped": (20000, 100, 1), "bdl-grouped": (8, 96, 1300), "rows-grouped-past-panel": (70000, 130, 1),
         "rows-streamed": (30000, 300, 1), "bdl-panel": (16, 384, 196), "rows-panel": (3000, 200, 1),
         "bdl-panel-large-n": (4, 256, 3136), "rows-dual": (200, 768, 1), "bdl-dual": (4, 1024, 49)}


@pytest.mark.parametrize("size", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("delta", [None, 0.05])
def test_bitwise_repeatable_and_thread_count_independent(size, delta):
    x3 = make_x3(*size, torch.float32, mean=50.0)
    gy3 = torch.randn(x3.shape)
    args = (0.5, 0.2, 1e-4, 2.0, delta)

    def run():
        return (*torch.ops.vcreg.stats_kernel(x3), *torch.ops.vcreg.backward_kernel(gy3, x3, *args))

    first, second = run(), run()
    threads = torch.get_num_threads()
    others = []
    try:
        for count in (1, 3, 8):  # more threads than cores is fine: the split must not care
            torch.set_num_threads(count)
            others.append(run())
    finally:
        torch.set_num_threads(threads)
    for outputs in [second] + others:
        for a, b in zip(first, outputs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("size", [(4, 9, 33), (2, 40, 9)], ids=["panel", "dual"])
def test_outputs_do_not_share_scratch(dtype, size):
    # The kernels keep per-thread scratch between calls; nothing they return may live in it.
    x_a, x_b = (make_x3(*size, dtype) for _ in range(2))
    mu_a, M2_a = torch.ops.vcreg.stats_kernel(x_a)
    gx_a, terms_a = torch.ops.vcreg.backward_kernel(x_a, x_a, 0.5, 0.2, 1e-4, 2.0, None)
    kept = [t.clone() for t in (mu_a, M2_a, gx_a, terms_a)]
    torch.ops.vcreg.stats_kernel(x_b)
    torch.ops.vcreg.backward_kernel(x_b, x_b, 0.5, 0.2, 1e-4, 2.0, None)
    for t, k in zip((mu_a, M2_a, gx_a, terms_a), kept):
        assert torch.equal(t, k)
