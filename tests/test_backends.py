"""The SPEC section 6 suite through the public op, on every backend.

Each test takes the ``backend_device`` fixture (tests/conftest.py): once per (backend, device)
pair, with that backend forced through ``vcreg_kernels.set_backend``; the pairs on "cuda" are
gpu-marked.
"""
import sys

import pytest
import torch
import torch.autograd.gradcheck  # noqa: F401

import vcreg_kernels
from conftest import dtype_id, spec_bound
from vcreg_kernels import _layout

gradcheck_module = sys.modules["torch.autograd.gradcheck"]

# (shape, dim): ranks 2 to 5, the feature dimension first, in the middle and last.
GRADCHECK_CASES = [
    ((7, 3), -1),
    ((4, 6), 0),
    ((3, 4, 5), 0),
    ((3, 4, 5), 1),
    ((3, 4, 5), -1),
    ((2, 3, 2, 3), 1),
    ((2, 3, 2, 3), -1),
    ((2, 2, 3, 2, 2), 2),
    ((5, 1), -1),  # d = 1: no covariance term
    ((2, 4), -1),  # n = 2
]


def _features(shape, dim, dtype=torch.float64, device="cpu", mean=0.0):
    """Random activations whose columns have spreads 0.4 or 2.5: clear of the hinge at gamma in [1, 1.5]."""
    x = torch.randn(shape, dtype=torch.float64)
    d = shape[dim]
    scale_shape = [1] * len(shape)
    scale_shape[dim] = d
    scales = torch.where(torch.rand(d) < 0.5, 0.4, 2.5).view(scale_shape)
    return (x * scales + mean).to(dtype=dtype, device=device)


def _implied_loss(w, alpha, beta, eps, gamma, delta, dim):
    """F(x) = <w, fused(x)> + loss(x), the loss term's value taken without autograd.

    Its analytic gradient comes only from fused's backward (w + d loss/dx), its numerical
    gradient from the loss itself: gradcheck of F checks fused against vcreg_loss.
    """

    def f(x):
        value = vcreg_kernels.vcreg_loss(x.detach(), alpha, beta, eps, gamma, delta, dim)
        return (torch.ops.vcreg.fused(x, alpha, beta, eps, gamma, delta, dim) * w).sum() + value

    return f


@pytest.mark.parametrize("shape,dim", GRADCHECK_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("gamma,delta", [(1.0, None), (1.5, 0.05)], ids=["sq", "smoothl1"])
def test_gradcheck_float64(backend_device, shape, dim, gamma, delta, monkeypatch):
    _, device = backend_device
    # fused's backward is affine in grad_y (it adds d(loss)/dx whatever grad_y is), so
    # gradcheck's final "backward is linear in grad_output" probe does not apply; the Jacobian
    # comparison that precedes it is the check we want. Likewise for the undefined-grad probe.
    monkeypatch.setattr(gradcheck_module, "_test_backward_mul_by_grad_output", lambda *a: True)
    x = _features(shape, dim, device=device).requires_grad_()
    w = torch.randn(shape, dtype=torch.float64, device=device)
    f = _implied_loss(w, 0.7, 0.9, 1e-4, gamma, delta, dim)
    assert torch.autograd.gradcheck(f, (x,), check_undefined_grad=False)


def _grads(x, grad_y, dim, **params):
    """(fused's grad_x, autograd's grad of <grad_y, x> + vcreg_loss(x)) at x."""
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(torch.ops.vcreg.fused(x, dim=dim, **params), x, grad_y)
    return g


def _reference_grads(x, grad_y, dim, **params):
    x64 = x.detach().to(torch.float64).requires_grad_()
    loss = vcreg_kernels.vcreg_loss(x64, dim=dim, **params)
    (reg,) = torch.autograd.grad(loss, x64)
    return grad_y.to(torch.float64) + reg, reg


def _matched_grad_y(x, dim, params):
    """A random grad_y as large as the regulariser's gradient, so neither hides the other's error."""
    _, reg = _reference_grads(x, torch.zeros((), dtype=torch.float64), dim, **params)
    grad_y = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    return (grad_y * reg.norm() / grad_y.norm()).to(x.dtype)


LAYOUT_CASES = [
    ("tokens", (6, 40, 24), -1, torch.contiguous_format),
    ("nchw", (5, 24, 6, 7), 1, torch.contiguous_format),
    ("channels_last", (5, 24, 6, 7), 1, torch.channels_last),
    ("rank2-dim0", (24, 90), 0, torch.contiguous_format),
]


@pytest.mark.parametrize("name,shape,dim,fmt", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
@pytest.mark.parametrize("mean", [0.0, 100.0], ids=["mean0", "mean100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=dtype_id)
def test_against_float64_reference(backend_device, name, shape, dim, fmt, mean, dtype):
    _, device = backend_device
    # Spread 1 with mean 100 is "mean 100x the spread" of SPEC section 6.
    x = (torch.randn(shape, dtype=torch.float64) + mean).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    params = dict(alpha=0.8, beta=0.6, eps=1e-4, gamma=1.2, delta=None)
    grad_y = _matched_grad_y(x, dim, params).contiguous(memory_format=fmt)
    expected, reg = _reference_grads(x, grad_y, dim, **params)
    got = _grads(x, grad_y, dim, **params)
    assert got.dtype == grad_y.dtype
    assert got.shape == x.shape
    assert got.stride() == x.stride(), "grad_x keeps x's layout"
    err = ((got.to(torch.float64) - expected).norm() / reg.norm()).item()
    # Low-precision grad_y rounds the output itself: that error is not the kernel's.
    floor = 0.0 if dtype in (torch.float32, torch.float64) else (
        (grad_y.to(torch.float64) + reg).to(dtype).to(torch.float64) - expected).norm().item() / reg.norm().item()
    assert err < spec_bound(dtype, *backend_device) + 2 * floor, f"relative error {err:.3g}"


@pytest.mark.parametrize("delta", [None, 0.02])
def test_delta_and_d1_against_reference(backend_device, delta):
    _, device = backend_device
    for shape, dim in [((64, 12), -1), ((40, 1), -1), ((3, 12, 4, 4), 1)]:
        x = _features(shape, dim, dtype=torch.float32, device=device, mean=3.0)
        params = dict(alpha=0.5, beta=2.0, eps=1e-4, gamma=3.0, delta=delta)  # every column active
        grad_y = _matched_grad_y(x, dim, params)
        expected, reg = _reference_grads(x, grad_y, dim, **params)
        err = ((_grads(x, grad_y, dim, **params).double() - expected).norm() / reg.norm()).item()
        assert err < spec_bound(torch.float32, *backend_device), (shape, err)


def test_strided_inputs(backend_device):
    """Non-contiguous x and grad_y (copied internally) give the right result."""
    _, device = backend_device
    base = _features((4, 30, 5, 9), 1, dtype=torch.float32, device=device)
    x = base[:, ::2, :, 1:8]  # non-dense
    params = dict(alpha=0.5, beta=0.7, eps=1e-4, gamma=1.0, delta=None)
    grad_y = _matched_grad_y(x, 1, params).transpose(2, 3).contiguous().transpose(2, 3)
    expected, reg = _reference_grads(x, grad_y, 1, **params)
    err = ((_grads(x, grad_y, 1, **params).double() - expected).norm() / reg.norm()).item()
    assert err < spec_bound(torch.float32, *backend_device)


def test_int32_overflowing_planes_take_a_row_major_copy(backend_device, monkeypatch):
    """A bdl tensor whose d*L passes int32 offsets reaches every backend as a row-major copy; the
    gradient comes back in x's strides. (The limit is lowered to make such a tensor small.)"""
    _, device = backend_device
    monkeypatch.setattr(_layout, "INT32_MAX", 50)
    x = _features((5, 7, 3, 3), 1, dtype=torch.float64, device=device)
    layout = _layout.choose(x, 1)
    assert layout.moved and layout.copied and layout.rows
    params = dict(alpha=0.5, beta=0.7, eps=1e-4, gamma=1.0, delta=None)
    grad_y = _matched_grad_y(x, 1, params)
    expected, reg = _reference_grads(x, grad_y, 1, **params)
    got = _grads(x, grad_y, 1, **params)
    assert got.stride() == x.stride()
    assert ((got - expected).norm() / reg.norm()).item() < spec_bound(torch.float64, *backend_device)


def test_forward_is_a_view(backend_device):
    _, device = backend_device
    x = torch.randn(8, 5, device=device, requires_grad=True)
    y = torch.ops.vcreg.fused(x, 0.1, 0.1)
    assert torch.equal(y, x)
    assert y.data_ptr() == x.data_ptr() and y._base is x, "the forward must not copy"


def test_inplace_on_output_is_refused(backend_device):
    _, device = backend_device
    x = torch.randn(8, 5, device=device, requires_grad=True)
    y = vcreg_kernels.vcreg(x * 1.0)
    with pytest.raises(RuntimeError, match="modified inplace"):
        y.add_(1.0)


def test_nan_and_inf_propagate(backend_device):
    _, device = backend_device
    shape = (16, 6)
    x = torch.randn(shape, device=device)
    grad_y = torch.randn(shape, device=device)
    grad_y[3, 2] = float("nan")
    grad_y[5, 1] = float("inf")
    g = _grads(x, grad_y, -1, alpha=0.5, beta=0.5)
    assert torch.isnan(g[3, 2]) and torch.isinf(g[5, 1])
    finite = torch.ones(shape, dtype=torch.bool, device=device)
    finite[3, 2] = finite[5, 1] = False
    assert torch.isfinite(g[finite]).all(), "grad_y's NaN/Inf only reach their own elements"
    x[7, 4] = float("nan")
    g = _grads(x, torch.randn(shape, device=device), -1, alpha=0.5, beta=0.5)
    # mu and C of column 4 are NaN, and through G every column that sees C[:, 4].
    assert torch.isnan(g[:, 4]).all()


@pytest.mark.parametrize("shape,dim,fmt", [((6, 5), -1, torch.contiguous_format),
                                           ((3, 4, 2, 5), 1, torch.contiguous_format),
                                           ((3, 4, 2, 5), 1, torch.channels_last)])
def test_opcheck_fused_backward(backend_device, shape, dim, fmt):
    _, device = backend_device
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    grad_y = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.vcreg.fused_backward.default, (grad_y, x, 0.3, 0.2, 1e-4, 1.0, None, dim))


def test_torch_compile_fullgraph_matches_eager(backend_device):
    _, device = backend_device
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        vcreg_kernels.VCReg(0.5, 0.4, dim=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(1),
        torch.nn.Linear(8 * 6 * 6, 16),
        vcreg_kernels.VCReg(0.5, 0.4, dim=-1, delta=0.1),
        torch.nn.Linear(16, 3),
    ).to(device)
    x = torch.randn(4, 3, 6, 6, device=device)

    def grads(m):
        m.zero_grad()
        m(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    eager = grads(model)
    compiled = grads(torch.compile(model, fullgraph=True))
    tol = 1e-5  # the same kernels on the same inputs; only the compiled code around them rounds differently
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=tol, atol=tol * e.abs().max().item())


def test_backward_op_is_seen_by_whatever_intercepts(backend_device):
    """In plain eager the layer's backward calls the op's implementation itself; anything that
    watches ops (a dispatch mode here; tracing and torch.compile likewise) still sees
    ``vcreg::fused_backward_terms``, and both routes give the same gradient, bitwise."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    _, device = backend_device
    x = torch.randn(3, 6, 4, 5, device=device) + 2.0
    grad_y = torch.randn_like(x)
    eager = _grads(x, grad_y, 1, alpha=0.5, beta=0.5)
    seen = Seen()
    with seen:
        watched = _grads(x, grad_y, 1, alpha=0.5, beta=0.5)
    assert "vcreg.fused_backward_terms" in seen.ops
    assert torch.equal(watched, eager)
    direct = torch.ops.vcreg.fused_backward(grad_y, x, 0.5, 0.5, 1e-4, 1.0, None, 1)
    assert torch.equal(direct, eager)


def test_torch_compile_forward_does_not_copy(backend_device):
    _, device = backend_device
    torch._dynamo.reset()
    f = torch.compile(lambda t: torch.ops.vcreg.fused(t, 0.1, 0.1, dim=1), fullgraph=True)
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    y = f(x)
    assert y.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("fmt,dim,rows", [(torch.contiguous_format, 1, False), (torch.channels_last, 1, True),
                                          (torch.contiguous_format, -1, True)])
def test_fast_layouts_need_no_copy(fmt, dim, rows):
    """SPEC section 5's fast paths reach the kernels as views: NCHW (bdl), channels_last and
    (..., d) (rows)."""
    x = torch.randn(2, 6, 3, 4).contiguous(memory_format=fmt)
    layout = _layout.choose(x, dim % 4)
    assert not layout.copied and layout.rows == rows
    x3 = _layout.canonical(x, layout)
    assert x3.data_ptr() == x.data_ptr() and x3.is_contiguous() and x3.shape == layout.shape


def test_deterministic(backend_device):
    _, device = backend_device
    x = torch.randn(300, 40, device=device) + 5
    grad_y = torch.randn_like(x)
    a = _grads(x, grad_y, -1, alpha=0.5, beta=0.5)
    b = _grads(x, grad_y, -1, alpha=0.5, beta=0.5)
    assert torch.equal(a, b)
