"""Shared test set-up: backends, the ``gpu`` marker, random inputs, and the one tolerance rule.

TRITON_INTERPRET=1 is set before anything imports triton when no GPU is present, so the triton
backend runs on CPU tensors through Triton's interpreter (SPEC section 6). On a GPU machine the
same tests run the kernels for real on CUDA tensors.

Tests that need a GPU carry ``@pytest.mark.gpu`` (the (backend, "cuda") parameters of the
backend-parametrised tests carry it too); where no GPU exists they are skipped at collection, so
``pytest -m "not gpu"`` runs everything else with no skip and ``pytest -m gpu`` selects them all.
"""
import contextlib
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vcreg_kernels import dispatch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
LOW = (torch.float16, torch.bfloat16)


def _cpu_backends():
    """The backends that run on CPU tensors here. The cpu backend counts whenever the extension
    was meant to be built, so that a broken build fails its tests instead of dropping them."""
    names = ["reference"]
    if os.environ.get("VCREG_NO_EXTENSION") != "1":
        names.append("cpu")
    if dispatch.backend("triton").unavailable("cpu") is None:
        names.append("triton")
    return names


# (backend, device): every backend that runs on CPU tensors here, and every GPU backend (gpu-marked).
BACKEND_DEVICES = [(b, "cpu") for b in _cpu_backends()] + [(b, "cuda") for b in ("cuda", "triton", "reference")]


def backend_params(extra=((),)):
    """pytest.param per (backend, device[, *extra]), gpu-marked on "cuda", with readable ids."""
    out = []
    for name, device in BACKEND_DEVICES:
        for more in extra:
            more = more if isinstance(more, tuple) else (more,)
            ident = "-".join([name, device] + [dtype_id(m) if isinstance(m, torch.dtype) else str(m) for m in more])
            out.append(pytest.param((name, device, *more), id=ident,
                                    marks=pytest.mark.gpu if device == "cuda" else ()))
    return out


def pytest_configure(config):
    print(f"vcreg_kernels backends here: { {d: dispatch.available_backends(d) for d in ('cpu', 'cuda')} }")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=backend_params())
def backend_device(request):
    """Runs a test once per (backend, device), with that backend forced."""
    name, device = request.param
    previous = dispatch.get_backend()
    dispatch.set_backend(name)
    yield name, device
    dispatch.set_backend(previous)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs in every test, reproducible per test.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_x3(B, d, L, dtype, mean=0.0, device="cpu"):
    """A canonical (B, d, L) tensor (rows when L == 1, else bdl; see vcreg_kernels/_layout.py):
    correlated features of spread about 1 and mean about ``mean`` (signs and sizes vary by column)."""
    n = B * L
    A = torch.eye(d, dtype=torch.float64) + torch.randn(d, d, dtype=torch.float64) / d**0.5
    X = torch.randn(n, d, dtype=torch.float64) @ A
    if mean:
        signs = torch.where(torch.rand(d) < 0.5, -1.0, 1.0).double()
        X += mean * signs * (0.5 + torch.rand(d, dtype=torch.float64))
    x3 = X.view(B, L, d).permute(0, 2, 1).contiguous()
    return x3.to(device=device, dtype=dtype)


def make_pair3(B, d, L, dtype, mean=0.0, device="cpu"):
    """Two canonical branches of the VICReg loss: za3 as ``make_x3``, zb3 = za3 + noise of half its
    spread, in dtype."""
    za = make_x3(B, d, L, torch.float64, mean)
    zb = za + 0.5 * torch.randn(za.shape, dtype=torch.float64)
    return za.to(device=device, dtype=dtype), zb.to(device=device, dtype=dtype)


def pair_operands(za3, zb3, g=2.5, gamma=1.5, mu_dtype=None):
    """(g, G_a, mu_a, G_b, mu_b, c): what the VICReg loss's forward hands a backend's pair_apply at
    the default coefficients (std 25, cov 1, sim 25: alpha 12.5, beta d - 1, c = 50 / (n d)), G from
    each branch's float64 statistics; in the accumulate dtype on z's device, mu in ``mu_dtype`` if
    given. ``gamma=None``: twice the largest standard deviation plus one (every hinge active)."""
    from vcreg_kernels._params import Params
    from vcreg_kernels.reference import accumulate_dtype, gradient_matrix_, vicreg_pair_stats_reference

    B, d, L = za3.shape
    n = B * L
    acc = accumulate_dtype(za3.dtype)
    mu_a, M2_a, mu_b, M2_b, _ = vicreg_pair_stats_reference(za3.double(), zb3.double())
    out = [torch.tensor(float(g), dtype=acc, device=za3.device)]
    for mu, M2 in ((mu_a, M2_a), (mu_b, M2_b)):
        hinge = gamma if gamma is not None else 2.0 * (M2.diagonal() / (n - 1) + 1e-4).sqrt().max().item() + 1.0
        G = gradient_matrix_(M2, n, Params(12.5, d - 1.0, 1e-4, hinge))[0]
        out += [G.to(acc), mu.to(mu_dtype or acc)]
    out.append(torch.tensor(50.0 / (n * d), dtype=acc, device=za3.device))
    return tuple(out)


@pytest.fixture
def highest_fp32_matmul():
    """torch's default float32 matmul precision ("highest") within the test, the previous after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms(True) within, as before afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def dtype_id(dtype):
    """Test ids that name the dtype ("float16"), not its position ("dtype2")."""
    return str(dtype).removeprefix("torch.")


def gamma_between(s):
    """A gamma that splits the hinges' s_j (a float64 tensor) into active and inactive ones, in the
    widest gap between consecutive s_j of the middle half, so no s_j is near the hinge's jump;
    for a single s_j, a gamma 25% above it."""
    s = s.sort().values
    if s.numel() == 1:
        return 1.25 * s.item()
    lo, hi = s.numel() // 4, max(s.numel() // 4 + 1, 3 * s.numel() // 4)
    k = lo + (s[lo + 1 : hi + 1] - s[lo:hi]).argmax().item()
    return 0.5 * (s[k] + s[k + 1]).item()


def rel_err(a, ref, scale=None):
    """Frobenius norm of ``a - ref`` (ref in float64) over ``scale`` (default: the norm of ref)."""
    diff = (a.detach().double().cpu() - ref.detach().double().cpu()).norm()
    return (diff / (ref.detach().double().cpu().norm() if scale is None else scale)).item()


# ---------------------------------------------------------------------------------------------
# The tolerance rule (STYLE.md): a kernel's error against a float64 reference is at most MULTIPLE
# times the error plain PyTorch makes at the same dtype, plus a floor stated per backend, and
# within SPEC section 2's bound for the dtype and the float32 matmul precision in force.

MULTIPLE = 4

# What each backend's arithmetic may add to plain PyTorch's own error, relative: float32 and
# float64 products over up to thousands of samples (a few hundred ulps); for 16-bit inputs, the
# operands the matrix units take (cuda: Y = X - K and G rounded once each to x's dtype; triton:
# bfloat16 operands, ~2^-9; cpu, for bfloat16 where the CPU multiplies bfloat16 natively: the
# shifted or centred values and G rounded once each, ~2^-9 apiece), the reference computing in
# float32, as the cpu backend does for float16 (and for bfloat16 elsewhere).
FLOOR = {
    "reference": {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6},
    "cpu": {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 2.0**-7},
    "cuda": {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7},
    "triton": {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3},
}


def spec_bound(dtype, backend, device):
    """SPEC section 2's bound on a gradient's relative error (section 6) for this input dtype,
    under the float32 matmul precision in force where the backend's products follow it: on a
    GPU, and in the triton backend's interpreter, which computes the GPU's products (the cpu
    backend and torch's CPU matmuls are exact)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype in LOW:
        return 2e-2
    if backend == "cpu" or (backend == "reference" and device == "cpu"):
        return 1e-4
    return {"highest": 1e-4, "high": 2e-3, "medium": 2e-2}[torch.get_float32_matmul_precision()]


def floor_scale(x3, dtype):
    """float64: plain PyTorch is the reference itself, so the kernel's own rounding of mu, eps |mu|
    relative to the spread, enters the floor."""
    if dtype != torch.float64:
        return 1.0
    X = x3.double().cpu().permute(0, 2, 1).reshape(-1, x3.shape[1])
    return 1.0 + (X.mean(0).abs().max() / X.std(0).clamp_min(1e-30).min()).item() if X.shape[0] > 1 else 1.0


def assert_within(err, err_plain, backend, dtype, device, what, floor_scale=1.0, floor=None):
    """The rule above for an error ``err`` (plain PyTorch's: ``err_plain``). ``floor_scale``
    widens the floor where plain PyTorch is the float64 reference itself (err_plain = 0) and the
    kernel's own rounding grows with |mu|/std; ``floor`` replaces the backend's where a test sets
    a product mode of its own (the triton backend's float32 matmul precision settings)."""
    bound = MULTIPLE * err_plain + (FLOOR[backend][dtype] if floor is None else floor) * floor_scale
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g} (plain torch: {err_plain:.3g})"
    limit = spec_bound(dtype, backend, device)
    assert err <= limit, f"{what}: relative error {err:.3g} > SPEC's {limit}"

