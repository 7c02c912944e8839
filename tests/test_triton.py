"""The triton backend's kernels (vcreg_kernels/triton_kernels.py) against reference.py.

Without a GPU these run through TRITON_INTERPRET=1 (set by conftest) on small CPU shapes; with one,
the same tests run the compiled kernels on CUDA tensors, and the ``gpu`` tests add larger shapes,
bfloat16, CUDA-graph capture and bitwise determinism. The generic cross-backend checks (gradcheck,
bad input, torch.compile) live in test_backends.py.

Tolerances (STYLE.md): the kernel's error against the float64 reference, relative to the norm of
the regulariser's gradient Xc @ G, must be within 4x the error that plain PyTorch (reference.py run
at the input dtype) makes, plus a floor, and within the SPEC's bound for the dtype.
"""
import math

import pytest
import torch

from conftest import HAS_GPU, gpu
from vcreg_kernels import reference as ref

tk = pytest.importorskip("vcreg_kernels.triton_kernels")

DEV = "cuda" if HAS_GPU else "cpu"
# Floors: what the kernels' dot precision adds (bf16x3: ~2^-17 per product; bfloat16 operands:
# ~2^-9) on top of plain PyTorch's own error. SPEC section 6 bounds: 1e-4 float32, 2e-2 16-bit.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3}
SPEC_BOUND = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
# float32-exact values, so that the interpreter (which passes Python floats as float32) is exact
# in float64 too.
ALPHA, BETA, EPS = 0.75, 0.625, 2.0**-13

DTYPES = [torch.float64, torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])


def make_x3(B, d, L, dtype, mean_scale=0.0, device=DEV):
    """(B, d, L) in the canonical layout: "rows" when L == 1, else contiguous "bdl". Correlated
    features with spreads 0.5..2.5 and means mean_scale times their spread (never zeros)."""
    n = B * L
    z = torch.randn(n, d, dtype=torch.float64)
    mix = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, dtype=torch.float64) / math.sqrt(d)
    spread = 0.5 + 2.0 * torch.rand(d, dtype=torch.float64)
    X = (z @ mix) * spread + mean_scale * spread * (1.0 + torch.rand(d, dtype=torch.float64))
    x3 = X.view(B, L, d).permute(0, 2, 1).contiguous()
    return x3.to(device=device, dtype=dtype)


def grad_like(x3, scale):
    """grad_y of the norm of the regulariser's gradient ``scale``, so neither term swamps the other."""
    g = torch.randn(x3.shape, dtype=torch.float64)
    g = g * (float(scale) / g.norm().item())
    return g.to(device=x3.device, dtype=x3.dtype).contiguous()


def rel(a, b, scale):
    return ((a.double().cpu() - b.double().cpu()).norm() / scale).item()


def check(err, err_torch, dtype, what):
    bound = min(4 * err_torch + FLOOR[dtype], SPEC_BOUND[dtype])
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g} (plain torch at {dtype}: {err_torch:.3g})"


def backward_case(B, d, L, dtype, gamma=4.0, delta=None, mean_scale=0.0):
    x3 = make_x3(B, d, L, dtype, mean_scale)
    x64 = x3.double().cpu()
    g0, _ = ref.vcreg_backward_reference(torch.zeros_like(x64), x64, ALPHA, BETA, EPS, gamma, delta)
    gy3 = grad_like(x3, g0.norm())
    want, terms_want = ref.vcreg_backward_reference(gy3.double().cpu(), x64, ALPHA, BETA, EPS, gamma, delta)
    plain, _ = ref.vcreg_backward_reference(gy3, x3, ALPHA, BETA, EPS, gamma, delta)
    got, terms = tk.vcreg_backward_triton(gy3, x3, ALPHA, BETA, EPS, gamma, delta)
    scale = (want - gy3.double().cpu()).norm().item()
    return x3, gy3, got, terms, want, terms_want, plain, scale


LAYOUTS = [pytest.param(1, id="rows"), pytest.param(7, id="bdl")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", LAYOUTS)
@pytest.mark.parametrize("d", [1, 5, 37])
def test_stats(dtype, L, d):
    B = 160 // L
    x3 = make_x3(B, d, L, dtype, mean_scale=3.0)
    mu, m2 = tk.vcreg_stats_triton(x3)
    mu_want, m2_want = ref.vcreg_stats_reference(x3.double().cpu())
    mu_plain, m2_plain = ref.vcreg_stats_reference(x3)
    assert mu.dtype == m2.dtype == ref.accumulate_dtype(dtype)
    assert mu.shape == (d,) and m2.shape == (d, d)
    assert torch.equal(m2, m2.T), "M2 must be exactly symmetric"
    check(rel(m2, m2_want, m2_want.norm()), rel(m2_plain, m2_want, m2_want.norm()), dtype, "M2")
    check(rel(mu, mu_want, mu_want.norm()), rel(mu_plain, mu_want, mu_want.norm()), dtype, "mu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_stats_many_chunks_and_blocks(dtype, monkeypatch):
    """Several column blocks (d > BLOCK_D) and one tile per chunk: Chan's merge over many chunks."""
    monkeypatch.setattr(tk, "STATS_PROGRAMS_PER_SM", 1000)
    monkeypatch.setattr(tk, "STATS_MIN_SAMPLES_PER_FEATURE", 0)
    d = tk.stats_config(10**6, dtype)["BLOCK_D"] + 3
    x3 = make_x3(3, d, 45, dtype, mean_scale=100.0)
    mu, m2 = tk.vcreg_stats_triton(x3)
    mu_want, m2_want = ref.vcreg_stats_reference(x3.double().cpu())
    _, m2_plain = ref.vcreg_stats_reference(x3)
    check(rel(m2, m2_want, m2_want.norm()), rel(m2_plain, m2_want, m2_want.norm()), dtype, "M2")
    assert rel(mu, mu_want, mu_want.norm()) <= FLOOR[dtype]


def test_stats_mean_over_many_chunks(monkeypatch):
    """mu after Chan's merge of hundreds of chunks at |mu| = 100 std, measured on the spread's
    scale (relative to |mu| it would hide): a running mean rounded to float32 at every merge
    drifts by several ulps of |mu|, six times plain PyTorch's error here."""
    monkeypatch.setattr(tk, "STATS_PROGRAMS_PER_SM", 1000)
    monkeypatch.setattr(tk, "STATS_MIN_SAMPLES_PER_FEATURE", 0)
    B, d = 528 * tk.stats_config(16, torch.float32)["BLOCK_S"], 16  # 528 chunks of one tile
    x3 = make_x3(B, d, 1, torch.float32, mean_scale=100.0)
    mu, _ = tk.vcreg_stats_triton(x3)
    X = x3.double().cpu().view(B, d)
    mu_want, std = X.mean(0), X.std(0)
    err = ((mu.double().cpu() - mu_want).abs() / std).max().item()
    err_plain = ((x3.view(B, d).mean(0).double().cpu() - mu_want).abs() / std).max().item()
    assert err <= 4 * err_plain + 1e-6, f"mu: {err:.3g} of the spread (plain torch: {err_plain:.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", LAYOUTS)
@pytest.mark.parametrize("d", [3, 40])
def test_apply(dtype, L, d):
    """grad_y + (X - mu) @ G for a general (not symmetric) G and an arbitrary mu."""
    x3 = make_x3(90 // L + 1, d, L, dtype)
    G = torch.randn(d, d, dtype=torch.float64) * 1e-2
    mu = torch.randn(d, dtype=torch.float64)
    acc = ref.accumulate_dtype(dtype)
    want0 = ref.vcreg_apply_reference(torch.zeros_like(x3.double().cpu()), x3.double().cpu(), G, mu)
    gy3 = grad_like(x3, want0.norm())
    want = ref.vcreg_apply_reference(gy3.double().cpu(), x3.double().cpu(), G, mu)
    plain = ref.vcreg_apply_reference(gy3, x3, G.to(acc).to(DEV), mu.to(acc).to(DEV))
    got = tk.vcreg_apply_triton(gy3, x3, G.to(acc).to(DEV), mu.to(acc).to(DEV))
    assert got.dtype == gy3.dtype and got.shape == x3.shape and got.stride() == x3.stride()
    scale = want0.norm().item()
    check(rel(got, want, scale), rel(plain, want, scale), dtype, "apply")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", LAYOUTS)
@pytest.mark.parametrize("d,delta", [(1, None), (6, 0.25), (33, None)])
def test_backward(dtype, L, d, delta):
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(150 // L, d, L, dtype, delta=delta)
    assert got.dtype == gy3.dtype and got.stride() == x3.stride()
    check(rel(got, want, scale), rel(plain, want, scale), dtype, "grad_x")
    assert terms.dtype == ref.accumulate_dtype(dtype)
    _, terms_plain = ref.vcreg_backward_reference(gy3, x3, ALPHA, BETA, EPS, 4.0, delta)
    check(rel(terms, terms_want, terms_want.norm()), rel(terms_plain, terms_want, terms_want.norm()), dtype, "terms")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("L", LAYOUTS)
def test_backward_large_mean(dtype, L):
    """Means 100x the spread: the shifted sums keep C accurate (SPEC section 2)."""
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(300 // L, 12, L, dtype, mean_scale=100.0)
    check(rel(got, want, scale), rel(plain, want, scale), dtype, "grad_x, mean 100x spread")


@pytest.mark.parametrize("gamma,delta", [(0.25, None), (10.0, 0.0625), (1.25, 2.0**-10)])
def test_backward_gamma_delta(gamma, delta):
    """Hinges all off, all on, and mixed; clipping of most covariances."""
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(40, 9, 3, torch.float64, gamma, delta)
    check(rel(got, want, max(scale, 1e-300)), 0.0, torch.float64, "grad_x")
    check(rel(terms, terms_want, terms_want.norm()), 0.0, torch.float64, "terms")


def test_backward_two_samples():
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(2, 4, 1, torch.float64, gamma=5.0)
    check(rel(got, want, scale), 0.0, torch.float64, "grad_x, n = 2")


def test_nan_propagates():
    x3 = make_x3(20, 5, 3, torch.float32)
    x3[4, 2, 1] = float("nan")
    gy3 = torch.randn(x3.shape, device=DEV)
    gy3[0, 0, 0] = float("inf")
    want, terms_want = ref.vcreg_backward_reference(gy3.double().cpu(), x3.double().cpu(), ALPHA, BETA, EPS, 1.5, None)
    got, terms = tk.vcreg_backward_triton(gy3, x3, ALPHA, BETA, EPS, 1.5, None)
    assert torch.equal(got.isnan().cpu(), want.isnan()) and torch.equal(got.isinf().cpu(), want.isinf())
    assert torch.equal(terms.isnan().cpu(), terms_want.isnan())


def test_strided_inputs_keep_strides():
    """A non-canonical x3 (a transposed view) and grad_y in another layout: correct, and grad_x in
    x3's strides."""
    base = make_x3(6, 11, 9, torch.float32).permute(2, 1, 0)  # (9, 11, 6), not contiguous
    gy3 = grad_like(base, 1e-3)
    want, _ = ref.vcreg_backward_reference(gy3.double().cpu(), base.double().cpu(), ALPHA, BETA, EPS, 1.5, None)
    got, _ = tk.vcreg_backward_triton(gy3, base, ALPHA, BETA, EPS, 1.5, None)
    assert got.stride() == base.stride()
    scale = (want - gy3.double().cpu()).norm().item()
    assert rel(got, want, scale) <= SPEC_BOUND[torch.float32]


def test_row_major_fallback(monkeypatch):
    """A "bdl" tensor whose d*L would overflow a tile's int32 offsets is read row-major instead."""
    monkeypatch.setattr(tk, "_INT32_MAX", 50)
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(5, 7, 9, torch.float64)
    assert got.stride() == x3.stride()
    check(rel(got, want, scale), 0.0, torch.float64, "grad_x via the row-major fallback")


@pytest.mark.parametrize(
    "shape,dim,channels_last",
    [((6, 5, 4, 3), 1, False), ((6, 5, 4, 3), 1, True), ((10, 3, 7), -1, False)],
    ids=["nchw", "channels_last", "tokens"],
)
def test_through_dispatch(shape, dim, channels_last):
    """The public op on the triton backend, for each fast layout of SPEC section 5."""
    import vcreg_kernels
    from vcreg_kernels import dispatch

    x = torch.randn(shape, dtype=torch.float64, device=DEV) * 2 + 5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    gy = torch.randn_like(x) * 1e-3
    previous = dispatch.get_backend()
    vcreg_kernels.set_backend("triton")
    try:
        got = torch.ops.vcreg.fused_backward(gy, x, ALPHA, BETA, EPS, 1.5, None, dim)
    finally:
        vcreg_kernels.set_backend(previous)
    vcreg_kernels.set_backend("reference")
    try:
        want = torch.ops.vcreg.fused_backward(gy, x, ALPHA, BETA, EPS, 1.5, None, dim)
    finally:
        vcreg_kernels.set_backend(previous)
    assert got.stride() == x.stride()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_config_table_covers_every_choice():
    """The host code only ever picks configurations that aot_cases() compiles."""
    compiled = {(c.kernel, tuple(sorted((k, v) for k, v in c.constexprs.items() if k.startswith("BLOCK"))))
                for c in tk.aot_cases(("cuda", 90))}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for d in (1, 2, 17, 31, 32, 33, 64, 65, 128, 129, 768, 2048, 8192, 10000):
            for kernel, cfg in ((tk._stats_kernel, tk.stats_config(d, dtype)), (tk._apply_kernel, tk.apply_config(d, dtype))):
                assert (kernel, cfg.blocks) in compiled, (dtype, d, cfg)


# --------------------------------------------------------------------------------------------
# GPU only: larger shapes, bfloat16, CUDA graphs, determinism.
# --------------------------------------------------------------------------------------------

GPU_SHAPES = [
    pytest.param((6400, 768, 1), id="vit-tokens"),
    pytest.param((8, 96, 3136), id="convnext-s1"),
    pytest.param((16, 384, 196), id="convnext-s3"),
    pytest.param((16, 2048, 49), id="resnet-s4"),
    pytest.param((600, 8192, 1), id="d8192"),
]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backward_large(shape, dtype):
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(*shape, dtype, mean_scale=100.0)
    check(rel(got, want, scale), rel(plain, want, scale), dtype, f"grad_x {shape}")


@gpu
def test_gpu_many_rows():
    """n in the millions (many chunks, Chan's merge) with a large mean."""
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(2_000_000, 16, 1, torch.float32, mean_scale=100.0)
    check(rel(got, want, scale), rel(plain, want, scale), torch.float32, "grad_x n = 2e6")


@gpu
@pytest.mark.parametrize("shape", [(64, 96, 196), (512, 300, 1)], ids=["bdl", "rows"])
def test_gpu_deterministic(shape):
    x3 = make_x3(*shape, torch.float32)
    gy3 = torch.randn_like(x3) * 1e-4
    first = tk.vcreg_backward_triton(gy3, x3, ALPHA, BETA, EPS, 1.5, 0.5)
    for _ in range(3):
        again = tk.vcreg_backward_triton(gy3, x3, ALPHA, BETA, EPS, 1.5, 0.5)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@gpu
def test_gpu_cuda_graph_capture():
    """No host synchronisation: the whole backward captures, and replays on new data."""
    x3 = make_x3(32, 192, 49, torch.float32)
    gy3 = torch.randn_like(x3) * 1e-4
    tk.vcreg_backward_triton(gy3, x3, ALPHA, BETA, EPS, 1.5, None)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tk.vcreg_backward_triton(gy3, x3, ALPHA, BETA, EPS, 1.5, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, terms = tk.vcreg_backward_triton(gy3, x3, ALPHA, BETA, EPS, 1.5, None)
    x3.copy_(make_x3(32, 192, 49, torch.float32, mean_scale=10.0))
    graph.replay()
    torch.cuda.synchronize()
    want, terms_want = tk.vcreg_backward_triton(gy3, x3, ALPHA, BETA, EPS, 1.5, None)
    assert torch.equal(out, want) and torch.equal(terms, terms_want)
