"""The C++ CPU kernels (csrc/vcreg_cpu.cpp) against the reference halves (vcreg_kernels/reference.py).

Inputs are the canonical (B, d, L) views of ``_layout``: "rows" (L == 1, X row-major) and "bdl"
(contiguous, slab b = X_b^T). Errors are relative Frobenius norms against a float64 reference and
are bounded, as STYLE.md asks, by a small multiple of the error plain PyTorch makes at the same
dtype (the reference run on the float32 input) plus a floor: a few hundred float32 ulps (1e-6;
products over up to thousands of samples) or float64 ulps (1e-13).
"""
import os

import pytest
import torch

from conftest import dtype_id, make_x3, rel_err
from vcreg_kernels import _extension
from vcreg_kernels.reference import (
    accumulate_dtype,
    vcreg_apply_reference,
    vcreg_backward_reference,
    vcreg_stats_reference,
)

# Only a build that opted out of the extension may go without these kernels: anywhere else a
# missing CPU kernel must fail these tests, not skip them.
pytestmark = pytest.mark.skipif(
    os.environ.get("VCREG_NO_EXTENSION") == "1" and not _extension.has_kernel("cpu"),
    reason="built with VCREG_NO_EXTENSION=1",
)

FLOOR = {torch.float32: 1e-6, torch.float64: 1e-13}
MULTIPLE = 4  # allowed multiple of plain PyTorch's own error at the same dtype

# (B, d, L) of each layout: tiny n and d, d = 257 (blocks of uneven width), sample counts that
# leave remainders in every gather chunk / apply block, bdl runs that cross slab boundaries, and
# the Gram plans of the statistics: per task sample ranges ("grouped", n >= 16 max(512, 2d) with
# d < 128, e.g. 8195 x 3 and 8 x 96 x 1300) and one centred panel of every sample ("panel", the
# others; "streamed" and "grouped" past 32 MiB have their own tests below).
ROWS = [(2, 1, 1), (3, 3, 1), (1031, 257, 1), (8195, 3, 1), (3000, 96, 1)]
BDL = [(1, 3, 2), (3, 1, 37), (3, 257, 37), (5, 96, 613), (16, 130, 49), (8, 96, 1300)]
# The backward's "dual" plan (delta None, n <= d: products with Xc Xc^T) at sizes of each layout,
# with blocks of uneven width and an apply of several sample blocks; with a delta they take the
# panel plan.
DUAL = [("rows", (150, 300, 1)), ("bdl", (3, 300, 49)), ("bdl", (7, 1100, 37))]
SIZES = [("rows", s) for s in ROWS] + [("bdl", s) for s in BDL]
SIZE_IDS = [f"{lay}-{'x'.join(map(str, s))}" for lay, s in SIZES]


def bound(torch_err, dtype):
    return MULTIPLE * torch_err + FLOOR[accumulate_dtype(dtype)]


@pytest.mark.parametrize("layout,size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("mean", [0.0, 100.0, 1000.0])
def test_stats_matches_reference(layout, size, dtype, mean):
    x3 = make_x3(layout, *size, dtype, mean)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    assert mu.dtype == M2.dtype == accumulate_dtype(dtype)
    assert mu.shape == (size[1],) and M2.shape == (size[1], size[1])
    assert torch.equal(M2, M2.T)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    mu_pt, M2_pt = vcreg_stats_reference(x3)
    # mu is compared on the spread's scale (the norm of the features' std): a relative error
    # against |mu| = 1000 would hide it. Its floor grows with |mu|/std, the rounding of mu itself.
    n = size[0] * size[2]
    scale = (M2_ref.diagonal().sum() / n).sqrt()
    mu_err = ((mu.double() - mu_ref).norm() / scale).item()
    mu_pt_err = ((mu_pt.double() - mu_ref).norm() / scale).item()
    floor = FLOOR[accumulate_dtype(dtype)] * (1 + (mu_ref.norm() / scale).item())
    assert mu_err <= MULTIPLE * mu_pt_err + floor
    assert rel_err(M2, M2_ref) <= bound(rel_err(M2_pt, M2_ref), dtype)


@pytest.mark.parametrize("layout,size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("mean", [0.0, 1000.0])
def test_apply_matches_reference(layout, size, dtype, mean):
    B, d, L = size
    x3 = make_x3(layout, B, d, L, dtype, mean)
    gy3 = torch.randn(x3.shape, dtype=dtype)
    G = torch.randn(d, d, dtype=torch.float64) / d**0.5
    G = (G + G.T).to(accumulate_dtype(dtype))
    mu = (x3.double().mean((0, 2)) + 0.1 * torch.randn(d, dtype=torch.float64)).to(accumulate_dtype(dtype))
    out = torch.ops.vcreg.apply_kernel(gy3, x3, G, mu)
    assert out.dtype == dtype and out.shape == x3.shape and out.stride() == x3.stride()
    ref = vcreg_apply_reference(gy3.double(), x3.double(), G.double(), mu.double())
    ref_pt = vcreg_apply_reference(gy3, x3, G, mu)
    # Relative to the regulariser's part (X - mu) G, as SPEC section 6 measures gradients.
    dX = ref - gy3.double()
    err = ((out.double() - ref).norm() / dX.norm()).item()
    err_pt = ((ref_pt.double() - ref).norm() / dX.norm()).item()
    assert err <= bound(err_pt, dtype)


@pytest.mark.parametrize(
    "layout,size",
    [("rows", (3000, 96, 1)), ("bdl", (5, 96, 613)), ("bdl", (3, 1, 37)), ("bdl", (8, 96, 1300)),
     ("bdl", (4, 160, 3000))] + DUAL,
    ids=["rows", "bdl", "bdl-d1", "bdl-grouped", "bdl-panel-12000-samples"]
    + [f"{lay}-small-n-{s[0] * s[2]}x{s[1]}" for lay, s in DUAL],
)
@pytest.mark.parametrize("mean", [0.0, 100.0, 1000.0])
@pytest.mark.parametrize("delta,gamma", [(None, 4.0), (0.05, 1.5)])
def test_backward_kernel_float32_large_mean(layout, size, mean, delta, gamma):
    # SPEC section 6: error over the norm of the regulariser's gradient d(loss)/dx below 1e-4.
    x3 = make_x3(layout, *size, torch.float32, mean)
    args = (0.7, 0.3, 1e-4, gamma, delta)
    reg, terms_ref = vcreg_backward_reference(torch.zeros_like(x3, dtype=torch.float64), x3.double(), *args)
    # grad_y of the regulariser's size: a much larger one would bury it in float32 rounding.
    gy3 = torch.randn(x3.shape) * (reg.std().item() or 1.0)
    gx, terms = torch.ops.vcreg.backward_kernel(gy3, x3, *args)
    ref = gy3.double() + reg
    ref_pt, _ = vcreg_backward_reference(gy3, x3, *args)
    assert gx.dtype == torch.float32 and terms.dtype == torch.float32
    if reg.norm() == 0:  # d = 1 with the hinge inactive: G = 0 and grad_x is grad_y exactly
        assert torch.equal(gx, gy3)
        return
    err = ((gx.double() - ref).norm() / reg.norm()).item()
    err_pt = ((ref_pt.double() - ref).norm() / reg.norm()).item()
    assert err < 1e-4
    assert err <= bound(err_pt, torch.float32)
    assert torch.allclose(terms.double(), terms_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout,size", [("rows", (30000, 300, 1)), ("bdl", (12, 300, 2500))])
def test_stats_across_super_panels(layout, size):
    # d > 256 and n * d * 4 bytes = 36 MB, past the 32 MiB panel, take the streamed plan: five
    # 8 MiB super-panels whose float64 sums are merged.
    x3 = make_x3(layout, *size, torch.float32, mean=300.0)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    mu_pt, M2_pt = vcreg_stats_reference(x3)
    assert (mu.double() - mu_ref).abs().max() <= MULTIPLE * (mu_pt.double() - mu_ref).abs().max() + 1e-6
    assert rel_err(M2, M2_ref) <= bound(rel_err(M2_pt, M2_ref), torch.float32)


@pytest.mark.parametrize(
    "layout,size",
    [
        ("rows", (20000, 100, 1)),
        ("bdl", (8, 96, 1300)),
        ("rows", (70000, 130, 1)),
        ("rows", (30000, 300, 1)),
        ("bdl", (16, 384, 196)),
        ("rows", (3000, 200, 1)),
        ("bdl", (4, 256, 3136)),
        ("rows", (200, 768, 1)),
        ("bdl", (4, 1024, 49)),
    ],
    ids=["rows-grouped", "bdl-grouped", "rows-grouped-past-panel", "rows-streamed", "bdl-panel", "rows-panel",
         "bdl-panel-large-n", "rows-dual", "bdl-dual"],
)
@pytest.mark.parametrize("delta", [None, 0.05])
def test_bitwise_repeatable_and_thread_count_independent(layout, size, delta):
    x3 = make_x3(layout, *size, torch.float32, mean=50.0)
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
    x_a, x_b = (make_x3("bdl", *size, dtype) for _ in range(2))
    mu_a, M2_a = torch.ops.vcreg.stats_kernel(x_a)
    gx_a, terms_a = torch.ops.vcreg.backward_kernel(x_a, x_a, 0.5, 0.2, 1e-4, 2.0, None)
    kept = [t.clone() for t in (mu_a, M2_a, gx_a, terms_a)]
    torch.ops.vcreg.stats_kernel(x_b)
    torch.ops.vcreg.backward_kernel(x_b, x_b, 0.5, 0.2, 1e-4, 2.0, None)
    for t, k in zip((mu_a, M2_a, gx_a, terms_a), kept):
        assert torch.equal(t, k)


@pytest.mark.parametrize("layout,size", [("rows", (300, 7, 1)), ("bdl", (3, 7, 37)), ("rows", (6, 9, 1)),
                                         ("bdl", (2, 40, 9))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_propagates(layout, size, bad):
    x3 = make_x3(layout, *size, torch.float32)
    x3[1, 2, 0] = bad
    gy3 = torch.randn(x3.shape)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    assert torch.equal(mu.isfinite(), mu_ref.isfinite()) and not mu[2].isfinite()
    assert torch.equal(M2.isfinite(), M2_ref.isfinite())
    gx, terms = torch.ops.vcreg.backward_kernel(gy3, x3, 0.5, 0.2, 1e-4, 1.0, None)
    ref, terms_ref = vcreg_backward_reference(gy3.double(), x3.double(), 0.5, 0.2, 1e-4, 1.0, None)
    assert torch.equal(gx.isnan(), ref.isnan()) and gx.isnan().any()
    assert torch.equal(terms.isnan(), terms_ref.isnan())


def test_layouts_strides_and_dtypes():
    B, d, L = 4, 24, 15
    x3 = make_x3("bdl", B, d, L, torch.float32, mean=10.0)
    gy3 = torch.randn(x3.shape)
    args = (0.5, 0.2, 1e-4, 2.0, 0.1)
    gx, terms = torch.ops.vcreg.backward_kernel(gy3, x3, *args)

    # Another stride pattern (a (B, d, L) view of a (B, L, d) tensor) falls back to a copy; the
    # result keeps the input's strides.
    x3_t = x3.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    gy3_t = gy3.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    gx_t, terms_t = torch.ops.vcreg.backward_kernel(gy3_t, x3_t, *args)
    assert gx_t.stride() == x3_t.stride()
    torch.testing.assert_close(gx_t, gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms_t, terms, rtol=1e-6, atol=0)
    # grad_y in another layout than x.
    gx_m, _ = torch.ops.vcreg.backward_kernel(gy3_t, x3, *args)
    assert gx_m.stride() == x3.stride()
    torch.testing.assert_close(gx_m, gx, rtol=0, atol=0)

    # grad_x takes grad_y's dtype; grad_y is added in x's accumulate dtype, as the reference does.
    gx_64, terms_32 = torch.ops.vcreg.backward_kernel(gy3.double(), x3, *args)
    assert gx_64.dtype == torch.float64 and terms_32.dtype == torch.float32
    torch.testing.assert_close(gx_64, gx.double(), rtol=0, atol=0)

    # Half and bfloat16 inputs run in float32 inside.
    for low in (torch.float16, torch.bfloat16):
        xl, gyl = x3.to(low), gy3.to(low)
        gxl, terms_l = torch.ops.vcreg.backward_kernel(gyl, xl, *args)
        ref, _ = vcreg_backward_reference(gyl.double(), xl.double(), *args)
        ref_pt, _ = vcreg_backward_reference(gyl, xl, *args)
        assert gxl.dtype == low and terms_l.dtype == torch.float32
        dX = ref - gyl.double()
        assert (gxl.double() - ref).norm() <= MULTIPLE * (ref_pt.double() - ref).norm() + 1e-6 * dX.norm()
        mu, M2 = torch.ops.vcreg.stats_kernel(xl)
        mu_ref, M2_ref = vcreg_stats_reference(xl.double())
        assert mu.dtype == torch.float32
        assert rel_err(M2, M2_ref) < 1e-5


def test_bad_arguments_raise():
    x3 = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match="canonical"):
        torch.ops.vcreg.stats_kernel(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="grad_y has shape"):
        torch.ops.vcreg.backward_kernel(torch.randn(4, 3, 6), x3, 1.0, 1.0, 1e-4, 1.0, None)
    with pytest.raises(RuntimeError, match="G must be"):
        torch.ops.vcreg.apply_kernel(x3, x3, torch.randn(3, 4), torch.randn(3))
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.vcreg.stats_kernel(torch.ones(4, 3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 2 samples"):
        torch.ops.vcreg.backward_kernel(torch.randn(1, 3, 1), torch.randn(1, 3, 1), 1.0, 1.0, 1e-4, 1.0, None)
