"""Shared test set-up.

TRITON_INTERPRET=1 is set before anything imports triton when no GPU is present, so the triton
backend runs on CPU tensors through Triton's interpreter (SPEC section 6). On a GPU machine the
same tests run the kernels for real on CUDA tensors.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import vcreg_kernels  # noqa: E402
from vcreg_kernels import dispatch  # noqa: E402

HAS_GPU = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def backend_cases():
    """(backend, device) pairs for every backend that runs on this machine."""
    return [(b, dev) for dev in DEVICES for b in dispatch.available_backends(dev)]


def pytest_configure(config):
    print(f"vcreg_kernels backends here: { {d: dispatch.available_backends(d) for d in DEVICES} }")


@pytest.fixture(params=backend_cases(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    """Runs a test once per (backend, device) available here, with that backend forced."""
    name, device = request.param
    previous = dispatch.get_backend()
    dispatch.set_backend(name)
    yield name, device
    dispatch.set_backend(previous)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs in every test, reproducible per test.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_x3(layout, B, d, L, dtype, mean=0.0, device="cpu"):
    """x3 (B, d, L) in ``layout`` ("rows" or "bdl", see vcreg_kernels/_layout.py) for the compiled
    kernels' tests: correlated features of spread about 1, mean about ``mean``."""
    n = B * L
    A = torch.eye(d, dtype=torch.float64, device=device) + torch.randn(d, d, dtype=torch.float64, device=device) / d**0.5
    X = torch.randn(n, d, dtype=torch.float64, device=device) @ A
    if mean:
        signs = torch.where(torch.rand(d, device=device) < 0.5, -1.0, 1.0).double()
        X += mean * signs * (0.5 + torch.rand(d, dtype=torch.float64, device=device))
    if layout == "rows":
        assert L == 1
        x3 = X.view(B, d, 1)
    else:
        x3 = X.view(B, L, d).permute(0, 2, 1).contiguous()
    return x3.to(dtype)


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


def rel_err(a, ref):
    """Relative Frobenius error of ``a`` against the float64 ``ref``."""
    return ((a.double() - ref).norm() / ref.norm()).item()


# GPU-only tests carry the registered ``gpu`` marker (``pytest -m gpu`` selects them); where no GPU
# exists, pytest_collection_modifyitems skips them.
gpu = pytest.mark.gpu


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
