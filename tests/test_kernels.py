"""Every backend's kernels against the float64 reference: stats, apply, the backward, non-finite
input, bad arguments, determinism and CUDA-graph capture, once for every (backend, device) pair
(conftest.BACKEND_DEVICES), through each backend's record in ``dispatch``.

Inputs are canonical (B, d, L) tensors (``_layout``): rows (L == 1) and bdl (L > 1). Errors are
relative Frobenius norms against float64, held to conftest's one rule: a multiple of plain
PyTorch's own error at the dtype (reference.py run on the same input) plus the backend's floor,
and within SPEC section 2's bound. What only one backend has (its work split, thread counts, chunk
merges, configuration tables) is tested in test_cpu.py, test_cuda.py and test_triton.py.
"""
import os

import pytest
import torch

from conftest import BACKEND_DEVICES, assert_within, deterministic, dtype_id, floor_scale, gamma_between, make_x3, rel_err
from vcreg_kernels import dispatch
from vcreg_kernels._params import Params
from vcreg_kernels.reference import (
    accumulate_dtype,
    vcreg_apply_reference,
    vcreg_backward_reference,
    vcreg_stats_reference,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (B, d, L): n = 2; rows with d a multiple of 16 (the triton backend reads it in place) and not
# (it copies); bdl with d = 1; bdl with L a multiple of 16 (read in place) and with sample runs
# that end mid-tile (L = 7). Kept small: the triton backend runs them through the interpreter on a CPU.
SIZES = [(2, 4, 1), (40, 32, 1), (150, 37, 1), (3, 1, 37), (4, 24, 32), (20, 33, 7)]
# On a GPU also the activations' scale: ViT tokens, ResNet stages, tiles and chunks with remainders.
GPU_SIZES = [(1031, 257, 1), (16, 130, 49), (50000, 768, 1), (64, 256, 784), (16, 2048, 49)]


def size_id(size):
    return ("rows-" if size[2] == 1 else "bdl-") + "x".join(map(str, size))


def cases(dtypes=DTYPES, sizes=True):
    """pytest.params of (backend, device, dtype[, size]): every pair of BACKEND_DEVICES, gpu-marked
    on "cuda"; GPU_SIZES for the GPU kernels (not torch's own ops) on "cuda" only."""
    out = []
    for name, device in BACKEND_DEVICES:
        for dtype in dtypes:
            large = GPU_SIZES if device == "cuda" and name != "reference" else []
            for size in (SIZES + large) if sizes else [None]:
                values = (name, device, dtype) + ((size,) if sizes else ())
                ident = "-".join([name, device, dtype_id(dtype)] + ([size_id(size)] if sizes else []))
                out.append(pytest.param(values, id=ident, marks=pytest.mark.gpu if device == "cuda" else ()))
    return out


# The float32 bounds here are those of torch's default matmul precision; keep it.
pytestmark = pytest.mark.usefixtures("highest_fp32_matmul")


@pytest.mark.parametrize("mean", [0.0, 1000.0])
@pytest.mark.parametrize("case", cases())
def test_stats(case, mean):
    name, device, dtype, size = case
    x3 = make_x3(*size, dtype, mean, device)
    mu, M2 = dispatch.backend(name).stats(x3)
    d = size[1]
    assert mu.dtype == M2.dtype == accumulate_dtype(dtype)
    assert mu.shape == (d,) and M2.shape == (d, d)
    assert torch.equal(M2, M2.T), "M2 must be exactly symmetric"
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    mu_pt, M2_pt = vcreg_stats_reference(x3)
    # mu on the spread's scale: a relative error against |mu| = 1000 would hide it.
    scale = M2_ref.diagonal().sum().sqrt().item() / max(size[0] * size[2] - 1, 1) ** 0.5 + 1e-30
    fs = floor_scale(x3, dtype)
    assert_within(rel_err(mu, mu_ref, scale), rel_err(mu_pt, mu_ref, scale), name, dtype, device, "mu", fs)
    if M2_ref.norm() > 0:  # two samples that round to the same value have M2 = 0
        assert_within(rel_err(M2, M2_ref), rel_err(M2_pt, M2_ref), name, dtype, device, "M2", fs)
    else:
        assert not M2.any()


@pytest.mark.parametrize("case", cases())
def test_apply(case):
    """grad_y + (X - mu) @ G for a general (not symmetric) G of a gradient's size and any mu."""
    name, device, dtype, size = case
    B, d, L = size
    acc = accumulate_dtype(dtype)
    x3 = make_x3(B, d, L, dtype, 1000.0, device)
    # G of a gradient's size (~alpha/(d n)), below float16's normal range where the output can
    # still hold dX: the cuda backend must scale G for its float16 operands.
    g_scale = 3e-4 if dtype == torch.float16 else 1e-6
    G = (torch.randn(d, d, dtype=torch.float64, device=device) / d**0.5 * g_scale).to(acc)
    mu = (x3.double().mean((0, 2)) + 0.1 * torch.randn(d, dtype=torch.float64, device=device)).to(acc)
    dX = vcreg_apply_reference(torch.zeros_like(x3, dtype=torch.float64), x3.double(), G.double(), mu.double())
    gy3 = (torch.randn(x3.shape, dtype=torch.float64, device=device) * dX.std()).to(dtype)
    out = dispatch.backend(name).apply(gy3, x3, G, mu)
    assert out.dtype == dtype and out.shape == x3.shape and out.is_contiguous()
    ref = vcreg_apply_reference(gy3.double(), x3.double(), G.double(), mu.double())
    plain = vcreg_apply_reference(gy3, x3, G, mu)
    # Relative to the regulariser's part (X - mu) G, as SPEC section 6 measures gradients.
    scale = dX.norm().item()
    assert_within(rel_err(out, ref, scale), rel_err(plain, ref, scale), name, dtype, device, "apply")


# Means 0 and 100x the spread (SPEC section 6); the hinge active for every column, and for some
# with the covariances clipped.
@pytest.mark.parametrize("mean,delta,hinges", [(0.0, None, "all"), (100.0, 0.05, "some"), (100.0, None, "all")],
                         ids=["mean0-all", "mean100-clipped-some", "mean100-all"])
@pytest.mark.parametrize("case", cases())
def test_backward(case, mean, delta, hinges):
    name, device, dtype, size = case
    x3 = make_x3(*size, dtype, mean, device)
    n = size[0] * size[2]
    mu64, M2 = vcreg_stats_reference(x3.double())
    s = (M2.diagonal() / (n - 1) + 1e-4).sqrt()
    # "all": gamma above every s_j. "some": gamma in the widest gap between them (at s_j == gamma
    # the gradient jumps by a column of G; an s_j within rounding of gamma would test a coin flip).
    gamma = 4.0 + s.max().item() if hinges == "all" else gamma_between(s)
    # alpha, beta scaled by n - 1 keep d(loss)/dx of order 1/d: unscaled, at n = 5e4 it falls
    # below float16's smallest subnormal and rounds away in any float16 gradient.
    params = Params(0.7 * (n - 1), 0.3 * (n - 1), 1e-4, gamma, delta)
    dX, _ = vcreg_backward_reference(torch.zeros_like(x3, dtype=torch.float64), x3.double(), params)
    # grad_y of the regulariser's size: grad_x's own rounding then does not hide the regulariser.
    gy3 = (torch.randn(x3.shape, dtype=torch.float64, device=device) * dX.std()).to(dtype)
    gx, terms = dispatch.backend(name).run_backward(gy3, x3, params)
    ref, terms_ref = vcreg_backward_reference(gy3.double(), x3.double(), params)
    plain, terms_pt = vcreg_backward_reference(gy3, x3, params)
    assert gx.dtype == dtype and gx.shape == x3.shape and gx.is_contiguous()
    assert terms.dtype == accumulate_dtype(dtype) and terms.shape == (2,)
    scale = dX.norm().item()
    fs = floor_scale(x3, dtype)
    assert_within(rel_err(gx, ref, scale), rel_err(plain, ref, scale), name, dtype, device, "grad_x", fs)
    # l_var on the scale of gamma (gamma - s_j may cancel to nearly nothing), l_cov on its own.
    scale_t = torch.tensor([gamma, terms_ref[1].abs().item() + 1e-30], dtype=torch.float64)
    err_t = ((terms.double().cpu() - terms_ref.cpu()).abs() / scale_t).max().item()
    err_t_pt = ((terms_pt.double().cpu() - terms_ref.cpu()).abs() / scale_t).max().item()
    assert_within(err_t, err_t_pt, name, dtype, device, "terms", fs)


@pytest.mark.parametrize("case", cases([torch.float32], sizes=False))
def test_grad_takes_grad_y_dtype(case):
    """grad_x has grad_y's dtype; a grad_y in another dtype than x is added in x's accumulate dtype."""
    name, device, dtype = case
    x3 = make_x3(30, 6, 3, torch.float32, 10.0, device)
    gy3 = torch.randn(x3.shape, dtype=torch.float64, device=device)
    params = Params(0.5, 0.2, 1e-4, 2.0, 0.1)
    gx, terms = dispatch.backend(name).run_backward(gy3, x3, params)
    ref, _ = vcreg_backward_reference(gy3, x3.double(), params)
    assert gx.dtype == torch.float64 and terms.dtype == torch.float32
    assert rel_err(gx - gy3, ref - gy3) < 1e-4  # the regulariser's part, computed in float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("size", [(300, 7, 1), (3, 7, 37), (6, 9, 1), (2, 40, 9)], ids=size_id)
@pytest.mark.parametrize("case", cases([torch.float32, torch.bfloat16], sizes=False))
def test_nonfinite_propagates(case, size, bad):
    """NaN/Inf in x reach mu and C of their column and, through G, grad_x as the math says."""
    name, device, dtype = case
    x3 = make_x3(*size, dtype, device=device)
    x3[1, 2, 0] = bad
    gy3 = torch.randn(x3.shape, device=device).to(dtype)
    mu, M2 = dispatch.backend(name).stats(x3)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    assert torch.equal(mu.isfinite().cpu(), mu_ref.isfinite().cpu()) and not mu[2].isfinite()
    assert torch.equal(M2.isfinite().cpu(), M2_ref.isfinite().cpu())
    params = Params(0.5, 0.2, 1e-4, 1.0, None)
    gx, terms = dispatch.backend(name).run_backward(gy3, x3, params)
    ref, terms_ref = vcreg_backward_reference(gy3.double(), x3.double(), params)
    assert torch.equal(gx.isnan().cpu(), ref.isnan().cpu()) and gx.isnan().any()
    assert torch.equal(terms.isnan().cpu(), terms_ref.isnan().cpu())


@pytest.mark.parametrize("case", cases([torch.float32], sizes=False))
def test_bad_arguments_raise(case):
    """What the backends assert of their canonical inputs, with the same messages everywhere."""
    name, device, _ = case
    record = dispatch.backend(name)
    x3 = torch.randn(4, 3, 5, device=device)
    p = Params(1.0, 1.0)
    with pytest.raises(RuntimeError, match="canonical"):
        record.stats(torch.randn(4, 3, device=device))
    with pytest.raises(RuntimeError, match="grad_y has shape"):
        record.run_backward(torch.randn(4, 3, 6, device=device), x3, p)
    with pytest.raises(RuntimeError, match="G must be"):
        record.apply(x3, x3, torch.randn(3, 4, device=device), torch.randn(3, device=device))
    with pytest.raises(RuntimeError, match="floating point"):
        record.stats(torch.ones(4, 3, 5, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="at least"):
        one = torch.randn(1, 3, 1, device=device)
        record.run_backward(one, one, p)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="grad_y is on"):
            record.run_backward(torch.randn(4, 3, 5), x3, p)


@pytest.mark.parametrize("size", [(400, 40, 1), (8, 24, 50)], ids=size_id)
@pytest.mark.parametrize("case", cases([torch.float32, torch.bfloat16], sizes=False))
def test_bitwise_repeatable(case, size, monkeypatch):
    """SPEC section 8: under torch.use_deterministic_algorithms(True) results repeat bitwise (our
    kernels have no atomics; the check covers the libraries they call)."""
    name, device, dtype = case
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    record = dispatch.backend(name)
    x3 = make_x3(*size, dtype, 50.0, device)
    gy3 = torch.randn(x3.shape, device=device).to(dtype)
    G = torch.randn(size[1], size[1], device=device) * 1e-6
    mu = x3.float().mean((0, 2))
    params = Params(0.5, 0.2, 1e-4, 2.0, None)

    def run():
        return (*record.stats(x3), *record.run_backward(gy3, x3, params), record.apply(gy3, x3, G, mu))

    with deterministic():
        first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("size", [(4096, 96, 1), (8, 64, 196)], ids=size_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_cuda_graph_capture(name, size, dtype):
    """No host synchronisation and no allocation outside the caching allocator: the halves and
    the backward capture, and a replay on new data gives the eager result for that data."""
    record = dispatch.backend(name)
    x3 = make_x3(*size, dtype, 20.0, "cuda")
    gy3 = torch.randn(x3.shape, device="cuda").to(dtype)
    G = torch.randn(size[1], size[1], device="cuda") * 1e-6
    mu = torch.randn(size[1], device="cuda") + 20.0
    params = Params(0.5, 0.2, 1e-4, 2.0, 0.3)

    def step():
        return (*record.run_backward(gy3, x3, params), *record.stats(x3), record.apply(gy3, x3, G, mu))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (compilation, cuBLAS handles, workspaces)
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x3.copy_(make_x3(*size, dtype, -5.0, "cuda"))
    gy3.copy_(torch.randn(x3.shape, device="cuda").to(dtype))
    graph.replay()
    eager = step()
    for c, e in zip(captured, eager):
        # Same kernels, but cuBLAS may pick another algorithm inside a capture: not bitwise.
        assert rel_err(c, e) < 1e-6 if e.norm() > 0 else not c.any()

