"""The triton backend (vcreg_kernels/triton_kernels/) against reference.py.

Without a GPU these run through TRITON_INTERPRET=1 (set by conftest) on small CPU shapes; there
the kernels keep bfloat16 and TF32 operands in float32 containers rounded exactly as the GPU's
conversions round them, so every precision mode computes the GPU's products. With a GPU the same
tests run the compiled kernels on CUDA tensors, and the ``gpu`` tests add larger shapes, the
autotuner, CUDA-graph capture and bitwise determinism. The generic cross-backend checks
(gradcheck, bad input, torch.compile) live in test_backends.py.

Tolerances (STYLE.md): the kernel's error against the float64 reference, relative to the norm of
the regulariser's gradient Xc @ G, must be within 4x the error that plain PyTorch (reference.py run
at the input dtype) makes, plus a floor for what the products' precision mode adds, and within
the SPEC's bound for the dtype and torch precision setting.
"""
import math

import pytest
import torch

import triton
import triton.language as tl

import vcreg_kernels.triton_kernels as tk
from conftest import HAS_GPU, assert_within, deterministic, dtype_id
from vcreg_kernels import reference as ref
from vcreg_kernels._params import Params
from vcreg_kernels.triton_kernels import configs, kernels, launch, precision
from vcreg_kernels.triton_kernels.precision import matmul_precision

DEV = "cuda" if HAS_GPU else "cpu"
# What each product mode adds to plain PyTorch's own error (relative, per SPEC section 2's
# table): bf16x3 ~2^-17 per product, TF32 rounded to nearest ~2^-12, bfloat16 operands ~2^-9.
FLOOR = {"fp64": 1e-12, "ieee": 2e-5, "bf16x3": 2e-5, "tf32": 1e-3, "bf16": 1e-2, "fp16": 5e-3}
# float32-exact values, so that the interpreter (which passes Python floats as float32) is exact
# in float64 too.
ALPHA, BETA, EPS = 0.75, 0.625, 2.0**-13

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (B-scale, L): rows (L = 1), bdl read in place (L a multiple of 16), bdl through the rows copy.
LAYOUTS = [pytest.param(1, id="rows"), pytest.param(16, id="bdl"), pytest.param(7, id="bdl-copy")]


def mode_of(dtype, setting="highest"):
    return precision.precision_mode(dtype, None if DEV == "cpu" else launch._device_target(0), setting)


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


def check(err, err_torch, dtype, what, setting="highest"):
    """conftest's rule, with the floor of the product mode that ``setting`` selects."""
    with matmul_precision(setting):
        assert_within(err, err_torch, "triton", dtype, DEV, what, floor=FLOOR[mode_of(dtype, setting)])


def backward_case(B, d, L, dtype, gamma=4.0, delta=None, mean_scale=0.0):
    x3 = make_x3(B, d, L, dtype, mean_scale)
    x64 = x3.double().cpu()
    g0, _ = ref.vcreg_backward_reference(torch.zeros_like(x64), x64, Params(ALPHA, BETA, EPS, gamma, delta))
    gy3 = grad_like(x3, g0.norm())
    want, terms_want = ref.vcreg_backward_reference(gy3.double().cpu(), x64, Params(ALPHA, BETA, EPS, gamma, delta))
    plain, _ = ref.vcreg_backward_reference(gy3, x3, Params(ALPHA, BETA, EPS, gamma, delta))
    got, terms = tk.vcreg_backward_triton(gy3, x3, Params(ALPHA, BETA, EPS, gamma, delta))
    scale = (want - gy3.double().cpu()).norm().item()
    return x3, gy3, got, terms, want, terms_want, plain, scale


# --------------------------------------------------------------------------------------------
# The passes.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def many_segments(monkeypatch):
    """A stats schedule of many programs with one or two sample tiles each: segments of every
    length, tiles split between programs, several block pairs per program."""
    monkeypatch.setattr(launch, "_num_sms_cpu", lambda: 37)
    monkeypatch.setattr(launch, "STATS_MIN_STEPS", 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_stats_many_segments_and_blocks(dtype, many_segments):
    """Several column blocks (d > 128) and segments across the stream-K schedule, mean 100x spread."""
    d = configs.stats_block_d(10**6, mode_of(dtype), None) + 3
    x3 = make_x3(3, d, 45, dtype, mean_scale=100.0)
    mu, m2 = tk.vcreg_stats_triton(x3)
    mu_want, m2_want = ref.vcreg_stats_reference(x3.double().cpu())
    _, m2_plain = ref.vcreg_stats_reference(x3)
    assert torch.equal(m2, m2.T)
    check(rel(m2, m2_want, m2_want.norm()), rel(m2_plain, m2_want, m2_want.norm()), dtype, "M2")
    assert rel(mu, mu_want, mu_want.norm()) <= FLOOR[mode_of(dtype)]


def test_stats_mean_over_many_segments(monkeypatch):
    """mu after merging hundreds of segments (one sample tile each) at |mu| = 100 std, measured on
    the spread's scale (relative to |mu| it would hide): a running mean rounded to float32 at every
    merge drifts by several ulps of |mu|; the two-pass merge relative to the first shift does not."""
    programs = 200
    monkeypatch.setattr(launch, "_num_sms_cpu", lambda: programs)
    monkeypatch.setattr(launch, "STATS_MIN_STEPS", 1)
    B, d = programs * configs.stats_config(16, "tf32", None)["BLOCK_S"], 16
    x3 = make_x3(B, d, 1, torch.float32, mean_scale=100.0)
    # TF32, the fewest products for the interpreter's time: its rounding of x - K (2^-11 of the
    # spread per sample) moves the mean far less than the drift this test looks for.
    with matmul_precision("high"):
        mu, _ = tk.vcreg_stats_triton(x3)
    X = x3.double().cpu().view(B, d)
    mu_want, std = X.mean(0), X.std(0)
    err = ((mu.double().cpu() - mu_want).abs() / std).max().item()
    err_plain = ((x3.view(B, d).mean(0).double().cpu() - mu_want).abs() / std).max().item()
    assert err <= 4 * err_plain + 1e-6, f"mu: {err:.3g} of the spread (plain torch: {err_plain:.3g})"


@pytest.mark.parametrize("setting", ["highest", "high", "medium"])
@pytest.mark.parametrize("L", LAYOUTS)
@pytest.mark.parametrize("mean_scale", [0.0, 1000.0], ids=["mean0", "mean1000"])
def test_backward_float32_at_every_precision_setting(setting, L, mean_scale):
    """float32 under each torch setting (SPEC section 2's table): "highest" (bf16x3) meets 1e-4,
    also where the means are 1000x the spread; "high" (TF32) 2e-3; "medium" (bf16) 2e-2."""
    with matmul_precision(setting):
        x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(
            300 // L, 24, L, torch.float32, mean_scale=mean_scale)
    check(rel(got, want, scale), rel(plain, want, scale), torch.float32, f"grad_x under {setting!r}", setting)


def test_float16_gradient_matrix_is_scaled():
    """float16 with features of spread ~5000 (alpha 2^-2, beta 2^-40): every entry of G lies below
    float16's smallest subnormal, while the regulariser's gradient (~1e-4) does not. Scaled by a
    power of two (and back in the epilogue), G keeps its precision; G in float16 as it is would be
    0 and grad_x would miss the regulariser."""
    alpha, beta, gamma = 2.0**-2, 2.0**-40, 2.0**15
    x3 = (make_x3(512, 6, 1, torch.float64) * 4096).to(torch.float16)
    x64 = x3.double().cpu()
    g0, _ = ref.vcreg_backward_reference(torch.zeros_like(x64), x64, Params(alpha, beta, EPS, gamma))
    gy3 = grad_like(x3, g0.norm())
    want, _ = ref.vcreg_backward_reference(gy3.double().cpu(), x64, Params(alpha, beta, EPS, gamma))
    plain, _ = ref.vcreg_backward_reference(gy3, x3, Params(alpha, beta, EPS, gamma))
    got, _ = tk.vcreg_backward_triton(gy3, x3, Params(alpha, beta, EPS, gamma))
    G, _ = ref.gradient_matrix(ref.vcreg_stats_reference(x64)[1] / 511, 512, Params(alpha, beta, EPS, gamma))
    assert G.abs().max() < 2.0**-24  # float16's smallest subnormal
    scale = (want - gy3.double().cpu()).norm().item()
    check(rel(got, want, scale), rel(plain, want, scale), torch.float16, "grad_x, float16")


def test_rows_copy_where_offsets_would_overflow(monkeypatch):
    """A "bdl" tensor whose tiles' int32 offsets would overflow is read through the rows copy, and
    grad_x written with samples in rows, then put in x3's strides."""
    monkeypatch.setattr(launch, "INT32_MAX", 1000)
    x3 = make_x3(5, 7, 32, torch.float64)
    assert launch._operand_layout(x3) is None
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(5, 7, 32, torch.float64)
    assert got.stride() == x3.stride()
    check(rel(got, want, scale), 0.0, torch.float64, "grad_x via the rows copy")


def test_operand_layouts():
    """In place where 16-byte loads are possible (rows: d % 16 == 0; bdl: L % 16 == 0), else the copy."""
    assert launch._operand_layout(make_x3(4, 32, 1, torch.float32)) == "rows"
    assert launch._operand_layout(make_x3(4, 5, 1, torch.float32)) is None
    assert launch._operand_layout(make_x3(4, 5, 48, torch.float32)) == "bdl"
    assert launch._operand_layout(make_x3(4, 32, 49, torch.float32)) is None
    assert launch._operand_layout(make_x3(4, 32, 48, torch.float32).transpose(0, 2)) is None


# --------------------------------------------------------------------------------------------
# Precision policy and the split arithmetic.
# --------------------------------------------------------------------------------------------

NVIDIA, AMPERE, MI200, MI300, MI50 = ("cuda", 90), ("cuda", 80), ("hip", "gfx90a"), ("hip", "gfx942"), ("hip", "gfx906")


@pytest.mark.parametrize("dtype,target,setting,mode", [
    (torch.float32, NVIDIA, "highest", "bf16x3"), (torch.float32, NVIDIA, "high", "tf32"),
    (torch.float32, NVIDIA, "medium", "bf16"), (torch.float32, AMPERE, "high", "tf32"),
    (torch.float32, MI200, "highest", "bf16x3"), (torch.float32, MI200, "high", "bf16x3"),
    (torch.float32, MI200, "medium", "bf16"), (torch.float32, MI300, "high", "tf32"),
    (torch.float32, MI50, "highest", "ieee"), (torch.float32, MI50, "medium", "ieee"),
    (torch.bfloat16, NVIDIA, "highest", "bf16"), (torch.bfloat16, MI200, "high", "bf16"),
    (torch.float16, NVIDIA, "medium", "fp16"), (torch.bfloat16, MI50, "highest", "ieee"),
    (torch.float64, NVIDIA, "high", "fp64"), (torch.float32, None, "high", "tf32"),
])
def test_precision_mode_follows_the_spec_table(dtype, target, setting, mode):
    assert precision.precision_mode(dtype, target, setting) == mode


@pytest.mark.parametrize("how,want", [
    (lambda: torch.set_float32_matmul_precision("highest"), "highest"),
    (lambda: torch.set_float32_matmul_precision("high"), "high"),
    (lambda: torch.set_float32_matmul_precision("medium"), "medium"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "high"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "highest"),
    (lambda: (torch.set_float32_matmul_precision("medium"),
              setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")), "highest"),
], ids=["set-highest", "set-high", "set-medium", "fp32_precision-tf32", "fp32_precision-ieee", "medium-then-ieee"])
def test_float32_setting_is_read_from_torch(how, want):
    """The setting torch's own CUDA matmuls read, through either of torch's APIs (SPEC section 2)."""
    with matmul_precision("highest"):
        how()
        assert precision.float32_matmul_setting() == want
        assert precision.precision_mode(torch.float32, NVIDIA) == {"highest": "bf16x3", "high": "tf32",
                                                                  "medium": "bf16"}[want]


@triton.jit
def _split_probe(Y_ptr, HI_ptr, LO_ptr, PRECISION: tl.constexpr, EMULATE: tl.constexpr, ASM: tl.constexpr):
    r = tl.arange(0, 1024)
    hi, lo = kernels._split(tl.load(Y_ptr + r), PRECISION, EMULATE, ASM)
    tl.store(HI_ptr + r, hi.to(tl.float32))
    tl.store(LO_ptr + r, lo.to(tl.float32))


def _split(y, mode):
    hi, lo = torch.empty_like(y), torch.empty_like(y)
    _split_probe[(1,)](y, hi, lo, PRECISION=mode, EMULATE=not HAS_GPU, ASM=HAS_GPU and torch.version.hip is None)
    return hi.double().cpu(), lo.double().cpu()


def _tf32_nearest(y):
    """y (float64) rounded to 11 significant bits, ties away from zero (cvt.rna.tf32.f32)."""
    m, e = torch.frexp(y.abs())
    return torch.sign(y) * torch.ldexp(torch.floor(m * 2048 + 0.5) / 2048, e)


def _spread_values(n=1024):
    y = torch.randn(n, dtype=torch.float64) * torch.exp2(torch.randint(-20, 20, (n,)).double())
    return y.float()


def test_split_rounds_as_the_hardware():
    """The kernels' operand split: bf16 parts by round-to-nearest-even (torch's conversion), lo the
    rounded remainder; TF32 by round-to-nearest, ties away (cvt.rna); both in the interpreter's
    float32 containers and on a GPU."""
    y = _spread_values().to(DEV)
    y64 = y.double().cpu()
    hi, lo = _split(y, "bf16x3")
    assert torch.equal(hi, y.cpu().to(torch.bfloat16).double())
    assert torch.equal(lo, (y64 - hi).float().to(torch.bfloat16).double())
    hi, _ = _split(y, "tf32")
    assert torch.equal(hi, _tf32_nearest(y64))
    ties = torch.tensor([1 + 2.0**-11, -(1 + 3 * 2.0**-11), 2.0**-126 * (1 + 2.0**-11)], dtype=torch.float32)
    hi, _ = _split(torch.cat([ties, ties.new_ones(1021)]).to(DEV), "tf32")
    assert hi[:3].tolist() == [1 + 2.0**-10, -(1 + 2 * 2.0**-10), 2.0**-126 * (1 + 2.0**-10)]


def test_split_products_are_float32_accurate():
    """hi*hi + hi*lo + lo*hi (bf16x3) reproduces float32 dot products to ~2^-16 of the sum of
    |products|; one bfloat16 product only to ~2^-8: the reason "highest" takes three."""
    y, z = _spread_values().to(DEV), _spread_values().to(DEV)
    (yh, yl), (zh, zl) = _split(y, "bf16x3"), _split(z, "bf16x3")
    exact = y.double().cpu() * z.double().cpu()
    x3 = yh * zh + yh * zl + yl * zh
    one = yh * zh
    scale = exact.abs().sum()
    assert (x3 - exact).abs().sum() / scale < 2.0**-15
    assert (one - exact).abs().sum() / scale > 2.0**-11


# --------------------------------------------------------------------------------------------
# Configurations, the autotuner, and the ahead-of-time cases.
# --------------------------------------------------------------------------------------------


def test_amd_warps_at_most_16():
    big = configs.cfg(4096, 2, BLOCK_M=128)
    assert big.launch(MI300)["num_warps"] == 16
    assert configs.cfg(256, 3, BLOCK_M=128).launch(MI300)["num_warps"] == 4
    assert configs.cfg(256, 3, BLOCK_M=128).launch(NVIDIA)["num_warps"] == 8


def test_apply_tile_fills_whole_waves():
    """The apply's heuristic tile: 64 samples where 128 would leave much of the last wave idle
    (ViT-B/32 tokens on 132 SMs: 300 tiles of 128 = 2.3 waves), else 128; 64 where grad_x is
    gathered (its epilogue holds an address per element)."""
    assert configs.apply_config(768, "bf16", NVIDIA, n=6400, num_sms=132)["BLOCK_M"] == 64
    assert configs.apply_config(256, "bf16", NVIDIA, n=128 * 3136, num_sms=132)["BLOCK_M"] == 128
    assert configs.apply_config(96, "bf16", AMPERE, n=128 * 3136, num_sms=108)["BLOCK_M"] == 128  # 64 saves 2%
    assert configs.apply_config(256, "bf16", NVIDIA, n=128 * 3136, num_sms=132, gathered=True)["BLOCK_M"] == 64


def test_autotune_only_where_results_cannot_change(monkeypatch):
    """Deterministic mode and CUDA-graph capture run the heuristic configuration."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(launch, "AUTOTUNE", True)
    assert launch.autotune_allowed()
    with deterministic():
        assert not launch.autotune_allowed()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not launch.autotune_allowed()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(launch, "AUTOTUNE", False)
    assert not launch.autotune_allowed()


@pytest.mark.parametrize("cache_results", [True, False])
def test_tuner_keeps_results_where_triton_can(monkeypatch, cache_results):
    """cache_results=True where this Triton's autotune takes it (>= 3.3), so a restart does not
    time again; without it, an autotuner all the same."""
    passed = {}
    real = triton.autotune

    def spy(*args, **kwargs):
        passed.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch.triton, "autotune", spy)
    monkeypatch.setattr(launch, "_CACHE_RESULTS", cache_results)
    launch._tuner.cache_clear()
    try:
        tuner = launch._tuner(kernels._apply_kernel, tuple(configs.apply_tuning(256, "bf16", NVIDIA)), NVIDIA)
    finally:
        launch._tuner.cache_clear()
    assert isinstance(tuner, triton.runtime.autotuner.Autotuner)
    assert passed["key"] == ["d_key", "n_key", "ROWS", "PRECISION"]
    assert len(tuner.configs) == len(configs.apply_tuning(256, "bf16", NVIDIA))
    assert passed.get("cache_results", False) is cache_results
    assert launch._CACHE_RESULTS is cache_results


def test_jit_specialisation_matches_triton():
    """The recorded compile cases specialise arguments as Triton's JIT does."""
    native = pytest.importorskip("triton.runtime.jit").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    args = (torch.empty(4, device="meta"), 1, 16, 17, 2**31, 48)
    for i, value in enumerate(args):
        kind, spec = native(BaseBackend, value, False, True, True)
        sig, consts, attrs = launch._signature(_spec_probe, args, {})
        name = list(sig)[i]
        if kind == "constexpr":
            assert consts[name] == value
        else:
            assert sig[name] == kind and ((i,) in attrs) == (spec == "D"), (value, kind, spec)


@triton.jit
def _spec_probe(P, a, b, c, e, f):
    pass


def test_aot_cases_for_follow_layout_and_precision():
    """What a call launches: the rows copy for odd L, the mode of the current torch setting."""
    vit = tk.aot_cases_for((128, 50, 768), -1, torch.bfloat16, NVIDIA, 132)
    assert [c.label for c in vit] == ["stats", "finalize G", "terms", "apply"]
    assert vit[0].constexprs["ROWS"] and vit[0].constexprs["PRECISION"] == "bf16"
    assert vit[0].grid == (132,)
    odd = tk.aot_cases_for((128, 2048, 7, 7), 1, torch.float32, NVIDIA, 132)
    assert [c.label for c in odd] == ["stats copy", "stats", "finalize G", "terms", "apply"]
    nchw = tk.aot_cases_for((128, 256, 56, 56), 1, torch.float32, NVIDIA, 132)
    assert not nchw[0].constexprs["ROWS"]
    for target, want in ((NVIDIA, "tf32"), (MI300, "tf32"), (MI200, "bf16x3"), (MI50, "ieee")):
        with matmul_precision("high"):
            cases = tk.aot_cases_for((128, 256, 56, 56), 1, torch.float32, target, 100)
        assert {c.constexprs["PRECISION"] for c in cases if c.label in ("stats", "apply")} == {want}
    stats = next(c for c in nchw if c.label == "stats")
    want = configs.stats_config(256, "bf16x3", NVIDIA)
    assert {k: stats.constexprs[k] for k, _ in want.blocks} == dict(want.blocks)
    assert stats.num_warps == 8 and stats.num_stages == want.num_stages


def test_aot_cases_for_the_vicreg_loss():
    """What one VICReg loss launches: each branch's stats, the invariance sum, each branch's G
    operand and one pair apply over both branches' tiles."""
    cases = tk.aot_cases_for((256, 2048), -1, torch.bfloat16, NVIDIA, 132, vicreg=True)
    assert [c.label for c in cases] == ["stats", "finalize M2"] * 2 + [
        "pair_stats invariance", "pair_stats invariance sum", "pair_apply operand", "pair_apply operand", "pair_apply"]
    pair = cases[-1]
    assert pair.kernel is kernels._pair_apply_kernel and pair.constexprs["ALGEBRAIC"] and pair.constexprs["ROWS"]
    tiles = -(-256 // pair.constexprs["BLOCK_M"]) * -(-2048 // pair.constexprs["BLOCK_N"])
    assert pair.grid == (2 * tiles,)
    odd = tk.aot_cases_for((64, 20), -1, torch.float32, NVIDIA, 132, vicreg=True)
    assert [c.label for c in odd].count("stats copy") == 4  # each branch's, for the stats and the apply


def _config_key(case):
    return (case.kernel, tuple(sorted((k, str(v)) for k, v in case.constexprs.items() if k.isupper())),
            case.num_warps, case.num_stages)


@pytest.mark.parametrize("target", [NVIDIA, MI300, MI50], ids=str)
def test_aot_cases_cover_every_launch(target):
    """aot_cases (the resource report) compiles every configuration a call can launch."""
    compiled = {_config_key(c) for c in tk.aot_cases(target)}
    for setting in ("highest", "high", "medium"):
        with matmul_precision(setting):
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                for shape, dim in (((64, 3), -1), ((8, 130, 5, 5), 1), ((4, 96, 4, 8), 1), ((3, 2048, 7, 7), 1)):
                    for vicreg in (False, True):
                        for case in tk.aot_cases_for(shape, dim, dtype, target, 132, vicreg=vicreg):
                            assert _config_key(case) in compiled, (setting, dtype, shape, vicreg, case.label)


# --------------------------------------------------------------------------------------------
# GPU only: larger shapes, the autotuner, CUDA graphs, determinism.
# --------------------------------------------------------------------------------------------

GPU_SHAPES = [
    pytest.param((6400, 768, 1), id="vit-tokens"),
    pytest.param((8, 96, 3136), id="convnext-s1"),
    pytest.param((16, 384, 196), id="convnext-s3"),
    pytest.param((16, 2048, 49), id="resnet-s4"),
    pytest.param((600, 8192, 1), id="d8192"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,setting", [(torch.float32, "highest"), (torch.float32, "high"),
                                           (torch.bfloat16, "highest")], ids=["float32-highest", "float32-high", "bfloat16"])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backward_large(shape, dtype, setting):
    with matmul_precision(setting):
        x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(*shape, dtype, mean_scale=100.0)
    check(rel(got, want, scale), rel(plain, want, scale), dtype, f"grad_x {shape}", setting)


@pytest.mark.gpu
def test_gpu_algebraic_apply_at_large_mean():
    """bfloat16 at d = 2048 with means 1000x the spread: X @ Gh - 1 (mu^T Gh) on the device's
    accumulator keeps the error of the centred form."""
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(16, 2048, 49, torch.bfloat16,
                                                                        mean_scale=1000.0)
    check(rel(got, want, scale), rel(plain, want, scale), torch.bfloat16, "grad_x, mean 1000x spread")


@pytest.mark.gpu
def test_gpu_many_rows():
    """n in the millions (many segments per block pair) with a large mean."""
    x3, gy3, got, terms, want, terms_want, plain, scale = backward_case(2_000_000, 16, 1, torch.float32, mean_scale=100.0)
    check(rel(got, want, scale), rel(plain, want, scale), torch.float32, "grad_x n = 2e6")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_gpu_autotuned_matches_heuristic(dtype, monkeypatch):
    """The autotuner's choice computes the same function as the heuristic configuration."""
    x3, gy3, _, _, want, _, plain, scale = backward_case(32, 256, 64, dtype)
    monkeypatch.setattr(launch, "AUTOTUNE", True)
    tuned, _ = tk.vcreg_backward_triton(gy3, x3, Params(ALPHA, BETA, EPS, 4.0))
    monkeypatch.setattr(launch, "AUTOTUNE", False)
    fixed, _ = tk.vcreg_backward_triton(gy3, x3, Params(ALPHA, BETA, EPS, 4.0))
    check(rel(tuned, want, scale), rel(plain, want, scale), dtype, "autotuned grad_x")
    check(rel(fixed, want, scale), rel(plain, want, scale), dtype, "heuristic grad_x")

