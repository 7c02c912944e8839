"""The CUDA kernels (csrc/cuda/) against the reference halves (vcreg_kernels/reference.py).

On a machine without a GPU only the registration test runs: a build with FORCE_CUDA=1 must have
registered the CUDA kernels of all three ops, and CI sets VCREG_EXPECT_CUDA=1 so that a build that
silently came out CPU-only fails here. The rest runs on a GPU (the ``gpu`` marker).

Inputs are the canonical (B, d, L) views of ``_layout``: "rows" (L == 1, X row-major) and "bdl"
(contiguous, NCHW with dim=1). Errors are relative Frobenius norms against a float64 reference,
bounded as STYLE.md asks by a small multiple of the error plain PyTorch makes at the same dtype
(the reference run on the same input on the GPU, which computes in float32 for every dtype but
float64) plus a floor: a few hundred float32 ulps (1e-6) or float64 ulps (1e-13), and for half and
bfloat16 one unit of the dtype's precision (torch.finfo(dtype).eps), since the kernels feed the
shifted data Y = X - K and G to the tensor cores in x's dtype (one rounding each, SPEC section 2).
TF32 is off in these tests (torch's default); SPEC section 6 allows 2e-3 when a user turns it on.
"""
import functools
import os

import pytest
import torch

from conftest import HAS_GPU, dtype_id, gamma_between, gpu, make_x3, rel_err
from vcreg_kernels import _extension, dispatch
from vcreg_kernels.reference import (
    accumulate_dtype,
    vcreg_apply_reference,
    vcreg_backward_reference,
    vcreg_stats_reference,
)

OPS = ("backward_kernel", "stats_kernel", "apply_kernel")
LOW = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MULTIPLE = 4  # allowed multiple of plain PyTorch's own error at the same dtype
SPEC_BOUND = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}  # SPEC section 6


def _has_cuda_kernel(op: str) -> bool:
    return _extension.load() and torch._C._dispatch_has_kernel_for_dispatch_key(f"vcreg::{op}", "CUDA")


def test_cuda_kernels_registered():
    expected = os.environ.get("VCREG_EXPECT_CUDA", "0") == "1"
    if not expected and not _has_cuda_kernel("backward_kernel"):
        pytest.skip("the extension was built without CUDA (set VCREG_EXPECT_CUDA=1 to require it)")
    assert _extension.load(), "vcreg_kernels._C does not import"
    missing = [op for op in OPS if not _has_cuda_kernel(op)]
    assert not missing, f"vcreg_kernels._C has no CUDA kernel for {missing} (built without FORCE_CUDA=1?)"
    assert "cuda" in dispatch.available_backends("cuda") or not HAS_GPU


needs_cuda_backend = pytest.mark.skipif(
    not (HAS_GPU and _has_cuda_kernel("backward_kernel")), reason="needs a GPU and the CUDA kernels built"
)


@pytest.fixture(autouse=True)
def _ieee_fp32_matmul():
    # The float32 bounds assume IEEE float32 products (torch's default); keep them so.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def floor(dtype):
    if dtype in LOW:
        return torch.finfo(dtype).eps
    return 1e-13 if dtype == torch.float64 else 1e-6


def bound(torch_err, dtype):
    return MULTIPLE * torch_err + floor(dtype)


# (B, d, L): tiny n and d, d not a multiple of the 32-column tiles, n with remainders in every
# chunk, bdl with L below and above the 256-thread step (the sample walk wraps within a step), and
# sizes large enough that the chunking of the SMs splits the samples.
ROWS = [(2, 1, 1), (3, 3, 1), (1031, 257, 1), (4099, 3, 1), (3000, 96, 1), (50000, 768, 1)]
BDL = [(1, 3, 2), (3, 1, 37), (3, 257, 37), (5, 96, 613), (16, 130, 49), (64, 256, 784)]
SIZES = [("rows", s) for s in ROWS] + [("bdl", s) for s in BDL]
SIZE_IDS = [f"{lay}-{'x'.join(map(str, s))}" for lay, s in SIZES]


# The compiled-kernel cases of tests/test_cpu.py, on the GPU.
make_x3 = functools.partial(make_x3, device="cuda")


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("layout,size", SIZES + [("rows", (1, 5, 1))], ids=SIZE_IDS + ["rows-n1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mean", [0.0, 100.0, 1000.0])
def test_stats_matches_reference(layout, size, dtype, mean):
    x3 = make_x3(layout, *size, dtype, mean)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    assert mu.dtype == M2.dtype == accumulate_dtype(dtype)
    assert mu.shape == (size[1],) and M2.shape == (size[1], size[1])
    assert torch.equal(M2, M2.T)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    mu_pt, M2_pt = vcreg_stats_reference(x3)
    # mu on the spread's scale: a relative error against |mu| = 1000 would hide it.
    scale = M2_ref.diagonal().mean().sqrt() * size[1] ** 0.5 + 1e-30
    mu_err = ((mu.double() - mu_ref).norm() / scale).item()
    mu_pt_err = ((mu_pt.double() - mu_ref).norm() / scale).item()
    assert mu_err <= bound(mu_pt_err, dtype)
    if M2_ref.norm() > 0:  # n = 1, or n = 2 of identical (rounded) samples, has M2 = 0
        assert rel_err(M2, M2_ref) <= bound(rel_err(M2_pt, M2_ref), dtype)
    else:
        assert not M2.any()


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("layout,size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mean", [0.0, 1000.0])
def test_apply_matches_reference(layout, size, dtype, mean):
    B, d, L = size
    acc = accumulate_dtype(dtype)
    x3 = make_x3(layout, B, d, L, dtype, mean)
    G = torch.randn(d, d, dtype=torch.float64, device="cuda") / d**0.5
    G = (G + G.T).to(acc) * 1e-7  # G's size in practice (~alpha/(d n)): fp16 needs the kernel's scaling
    mu = (x3.double().mean((0, 2)) + 0.1 * torch.randn(d, dtype=torch.float64, device="cuda")).to(acc)
    dX = (vcreg_apply_reference(torch.zeros_like(x3, dtype=torch.float64), x3.double(), G.double(), mu.double()))
    gy3 = (torch.randn(x3.shape, dtype=torch.float64, device="cuda") * dX.std()).to(dtype)
    out = torch.ops.vcreg.apply_kernel(gy3, x3, G, mu)
    assert out.dtype == dtype and out.shape == x3.shape and out.stride() == x3.stride()
    ref = vcreg_apply_reference(gy3.double(), x3.double(), G.double(), mu.double())
    ref_pt = vcreg_apply_reference(gy3, x3, G, mu)
    # Relative to the regulariser's part (X - mu) G, as SPEC section 6 measures gradients.
    err = ((out.double() - ref).norm() / dX.norm()).item()
    err_pt = ((ref_pt.double() - ref).norm() / dX.norm()).item()
    # Y and G each rounded once to x's dtype for the tensor cores: one eps more than the floor.
    assert err <= bound(err_pt, dtype) + (floor(dtype) if dtype in LOW else 0.0)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("layout,size", [("rows", (3000, 96, 1)), ("bdl", (5, 96, 613)), ("bdl", (3, 1, 37)),
                                         ("rows", (50000, 768, 1)), ("bdl", (64, 256, 784))],
                         ids=["rows", "bdl", "bdl-d1", "rows-vit", "bdl-resnet"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mean", [0.0, 100.0, 1000.0])
@pytest.mark.parametrize("delta,hinges", [(None, "all"), (0.05, "some")])
def test_backward_kernel_matches_reference(layout, size, dtype, mean, delta, hinges):
    x3 = make_x3(layout, *size, dtype, mean)
    n = size[0] * size[2]
    mu64, M2 = vcreg_stats_reference(x3.double())
    s = (M2.diagonal() / (n - 1) + 1e-4).sqrt()
    # "all": gamma above every s_j (about 1.4 here). "some": gamma between the s_j, as far from
    # each as the data allow: at s_j == gamma the gradient jumps by a whole column of G, and an
    # s_j within rounding distance of gamma would test the coin flip, not the kernel.
    gamma = 4.0 if hinges == "all" else gamma_between(s)
    # alpha and beta scaled by n - 1, so that d(loss)/dx is of order 1/d whatever n is: unscaled,
    # at n = 5e4 it is about 1e-8, below float16's smallest subnormal (6e-8), and rounds away
    # in any float16 gradient, the reference's included.
    args = (0.7 * (n - 1), 0.3 * (n - 1), 1e-4, gamma, delta)
    dX, _ = vcreg_backward_reference(torch.zeros_like(x3, dtype=torch.float64), x3.double(), *args)
    # grad_y of the regulariser's size: grad_x's own rounding then does not hide the regulariser.
    gy3 = (torch.randn(x3.shape, dtype=torch.float64, device="cuda") * dX.std()).to(dtype)
    gx, terms = torch.ops.vcreg.backward_kernel(gy3, x3, *args)
    ref, terms_ref = vcreg_backward_reference(gy3.double(), x3.double(), *args)
    ref_pt, terms_pt = vcreg_backward_reference(gy3, x3, *args)
    assert gx.dtype == dtype and gx.stride() == x3.stride()
    assert terms.dtype == accumulate_dtype(dtype) and terms.shape == (2,)
    err = ((gx.double() - ref).norm() / dX.norm()).item()
    err_pt = ((ref_pt.double() - ref).norm() / dX.norm()).item()
    extra = floor(dtype) if dtype in LOW else 0.0  # Y and G rounded once each to x's dtype
    if dtype == torch.float64:
        # Plain PyTorch at float64 is the reference itself (err_pt = 0), so its own error enters
        # as the floor: the rounding of mu, eps |mu| / std relative to the spread.
        extra = floor(dtype) * (mu64.abs().max() / s.min()).item()
    assert err < SPEC_BOUND[dtype]
    assert err <= bound(err_pt, dtype) + extra
    # l_var on the scale of gamma (gamma - s_j may cancel to nearly nothing), l_cov on its own.
    scale = torch.tensor([gamma, terms_ref[1].abs().item() + 1e-30], dtype=torch.float64, device="cuda")
    terms_err = ((terms.double() - terms_ref).abs() / scale).max().item()
    terms_pt_err = ((terms_pt.double() - terms_ref).abs() / scale).max().item()
    assert terms_err <= bound(terms_pt_err, dtype)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize(
    "shape,dim,fmt",
    [((8, 64, 14, 14), 1, "nchw"), ((8, 64, 14, 14), 1, "channels_last"), ((16, 50, 96), -1, "tokens"),
     ((16, 50, 96), 1, "tokens-dim1"), ((8, 64, 14, 14), 1, "strided")],
)
def test_dispatch_layouts(shape, dim, fmt):
    # The whole path the op takes (canonical views, the kernel, the restore) against the reference.
    x = torch.randn(shape, device="cuda") * 2.0 + 100.0
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif fmt == "strided":
        x = x.transpose(2, 3)
    gy = torch.randn_like(x) * 1e-3
    args = (0.5, 0.2, 1e-4, 3.0, None, dim % x.dim())  # gamma well above s_j ~ 2: l_var is no cancellation
    gx, terms = dispatch.vcreg_backward(gy, x, *args, backend="cuda")
    ref, terms_ref = dispatch.vcreg_backward(gy.double(), x.double(), *args, backend="reference")
    dX = ref - gy.double()
    assert gx.shape == x.shape and gx.dtype == x.dtype
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert gx.stride() == x.stride()
    assert ((gx.double() - ref).norm() / dX.norm()).item() < 1e-4
    torch.testing.assert_close(terms.double(), terms_ref, rtol=1e-4, atol=0)


@gpu
@needs_cuda_backend
def test_strides_and_mixed_dtypes():
    B, d, L = 4, 24, 15
    x3 = make_x3("bdl", B, d, L, torch.float32, mean=10.0)
    gy3 = torch.randn(x3.shape, device="cuda")
    args = (0.5, 0.2, 1e-4, 2.0, 0.1)
    gx, terms = torch.ops.vcreg.backward_kernel(gy3, x3, *args)
    # Another stride pattern runs on a contiguous copy; the result keeps the input's strides.
    x3_t = x3.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    gy3_t = gy3.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    gx_t, terms_t = torch.ops.vcreg.backward_kernel(gy3_t, x3_t, *args)
    assert gx_t.stride() == x3_t.stride()
    assert torch.equal(gx_t, gx) and torch.equal(terms_t, terms)
    out_t = torch.ops.vcreg.apply_kernel(gy3_t, x3_t, torch.eye(d, device="cuda"), x3.mean((0, 2)))
    assert out_t.stride() == x3_t.stride()
    # grad_x takes grad_y's dtype; grad_y is added in x's accumulate dtype, as the reference does.
    gx_64, terms_32 = torch.ops.vcreg.backward_kernel(gy3.double(), x3, *args)
    assert gx_64.dtype == torch.float64 and terms_32.dtype == torch.float32
    assert torch.equal(gx_64, gx.double())
    gx_16, _ = torch.ops.vcreg.backward_kernel(gy3.half(), x3, *args)
    assert gx_16.dtype == torch.float16


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("layout,size", [("rows", (50000, 257, 1)), ("bdl", (32, 130, 784))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_bitwise_repeatable(layout, size, dtype, monkeypatch):
    # Older torch refuses cuBLAS under deterministic mode without this (read when mm is called).
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    x3 = make_x3(layout, *size, dtype, mean=50.0)
    gy3 = torch.randn(x3.shape, device="cuda").to(dtype)
    args = (0.5, 0.2, 1e-4, 2.0, None)
    G = torch.randn(size[1], size[1], device="cuda") * 1e-6

    def run():
        return (*torch.ops.vcreg.stats_kernel(x3), *torch.ops.vcreg.backward_kernel(gy3, x3, *args),
                torch.ops.vcreg.apply_kernel(gy3, x3, G, x3.float().mean((0, 2))))

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous)
    third = run()
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("layout,size", [("rows", (4096, 96, 1)), ("bdl", (8, 64, 196))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_cuda_graph_capture(layout, size, dtype):
    # No host synchronisation and no allocation outside the caching allocator: the three ops
    # capture, and a replay on new data gives the eager result for that data.
    x3 = make_x3(layout, *size, dtype, mean=20.0)
    gy3 = torch.randn(x3.shape, device="cuda").to(dtype)
    G = torch.randn(size[1], size[1], device="cuda") * 1e-6
    mu = torch.randn(size[1], device="cuda") + 20.0
    args = (0.5, 0.2, 1e-4, 2.0, 0.3)

    def step():
        return (*torch.ops.vcreg.backward_kernel(gy3, x3, *args), *torch.ops.vcreg.stats_kernel(x3),
                torch.ops.vcreg.apply_kernel(gy3, x3, G, mu))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS handles, workspaces)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x3.copy_(make_x3(layout, *size, dtype, mean=-5.0))
    gy3.copy_(torch.randn(x3.shape, device="cuda").to(dtype))
    graph.replay()
    eager = step()
    for c, e in zip(captured, eager):
        # Same kernels, but cuBLAS may pick another algorithm inside a capture: not bitwise.
        assert ((c.double() - e.double()).norm() / e.double().norm()).item() < 1e-6 if e.norm() > 0 else not c.any()


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("layout,size", [("rows", (300, 7, 1)), ("bdl", (3, 7, 37))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_nonfinite_propagates(layout, size, bad, dtype):
    x3 = make_x3(layout, *size, dtype)
    x3[1, 2, 0] = bad
    gy3 = torch.randn(x3.shape, device="cuda").to(dtype)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    assert torch.equal(mu.isfinite(), mu_ref.isfinite()) and not mu[2].isfinite()
    assert torch.equal(M2.isfinite(), M2_ref.isfinite())
    gx, terms = torch.ops.vcreg.backward_kernel(gy3, x3, 0.5, 0.2, 1e-4, 1.0, None)
    ref, terms_ref = vcreg_backward_reference(gy3.double(), x3.double(), 0.5, 0.2, 1e-4, 1.0, None)
    assert torch.equal(gx.isnan(), ref.isnan()) and gx.isnan().any()
    assert torch.equal(terms.isnan(), terms_ref.isnan())


@gpu
@needs_cuda_backend
def test_bad_arguments_raise():
    x3 = torch.randn(4, 3, 5, device="cuda")
    with pytest.raises(RuntimeError, match="canonical"):
        torch.ops.vcreg.stats_kernel(torch.randn(4, 3, device="cuda"))
    with pytest.raises(RuntimeError, match="grad_y has shape"):
        torch.ops.vcreg.backward_kernel(torch.randn(4, 3, 6, device="cuda"), x3, 1.0, 1.0, 1e-4, 1.0, None)
    with pytest.raises(RuntimeError, match="grad_y is on"):
        torch.ops.vcreg.backward_kernel(torch.randn(4, 3, 5), x3, 1.0, 1.0, 1e-4, 1.0, None)
    with pytest.raises(RuntimeError, match="G must be"):
        torch.ops.vcreg.apply_kernel(x3, x3, torch.randn(3, 4, device="cuda"), torch.randn(3, device="cuda"))
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.vcreg.stats_kernel(torch.ones(4, 3, 5, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="at least 2 samples"):
        one = torch.randn(1, 3, 1, device="cuda")
        torch.ops.vcreg.backward_kernel(one, one, 1.0, 1.0, 1e-4, 1.0, None)
