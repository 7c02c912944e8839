"""The VICReg loss (SPEC section 9) on every backend available here, against plain autograd of its formula.

The formula is ``reference.vicreg_loss_reference`` (section 9 in plain PyTorch); each backend runs
its record's pair kernels (``dispatch.Backend``): the reference, cpu and triton backends their own,
cuda its halves composed. Errors are relative Frobenius norms of a branch's gradient against float64 plain
autograd, bounded by conftest's rule (STYLE.md): a multiple of the error plain PyTorch makes at
the same dtype (here facebookresearch/vicreg's formula run in that dtype) plus the backend's floor,
and SPEC section 6's bound for the dtype.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcreg_kernels
from conftest import (FLOOR, HAS_GPU, MULTIPLE, assert_within, deterministic, dtype_id, floor_scale, make_pair3,
                      pair_operands, rel_err, spec_bound)
from vcreg_kernels import dispatch, reference
from vcreg_kernels.reference import vicreg_loss_reference

COEFFS = dict(sim_coeff=20.0, std_coeff=30.0, cov_coeff=2.0)


# The float32 bounds here are those of torch's default matmul precision; keep it.
pytestmark = pytest.mark.usefixtures("highest_fp32_matmul")


def make_pair(shape, dtype=torch.float64, mean=0.0, gap=0.5, device="cpu"):
    """Two views z_a, z_b = z_a + noise: correlated features of standard deviation 0.4 or 2.5 (half
    the hinges active at gamma = 1.5), mean ``mean``; ``gap`` sets the invariance part's size."""
    d = shape[-1]
    A = torch.eye(d, dtype=torch.float64) + torch.randn(d, d, dtype=torch.float64) / d**0.5
    scales = torch.where(torch.rand(d) < 0.5, 0.4, 2.5).double()
    z = torch.randn(shape, dtype=torch.float64) @ A
    flat = z.reshape(-1, d)
    z_a = (z - flat.mean(0)) / flat.std(0).clamp_min(1e-3) * scales + mean if flat.shape[0] > 1 else z + mean
    z_b = z_a + gap * torch.randn(shape, dtype=torch.float64) * scales
    return z_a.to(device=device, dtype=dtype), z_b.to(device=device, dtype=dtype)


def mean_rounding(z):
    """2^-24 |mu| / std, largest over the features: what rounding mu to float32 costs a centred row,
    the error SPEC section 2 allows the apply (float32 mu) at any input dtype but float64."""
    flat = z.double().reshape(-1, z.shape[-1])
    return 2.0**-24 * (flat.mean(0).abs() / flat.std(0)).max().item()


def grads(loss_fn, z_a, z_b, **kw):
    """(loss, grad_z_a, grad_z_b) of ``loss_fn(z_a, z_b, **kw)``."""
    a, b = z_a.detach().requires_grad_(), z_b.detach().requires_grad_()
    loss = loss_fn(a, b, **kw)
    ga, gb = torch.autograd.grad(loss, (a, b))
    return loss.detach(), ga, gb


def rel(a, ref):
    return ((a.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def facebook_loss(x, y, sim_coeff, std_coeff, cov_coeff, eps=1e-4, gamma=1.0):
    """facebookresearch/vicreg's main_vicreg.py formula, plain PyTorch in the inputs' own dtype: the
    yardstick for what a dtype costs."""
    n, d = x.reshape(-1, x.shape[-1]).shape
    x, y = x.reshape(n, d), y.reshape(n, d)
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = torch.mean(F.relu(gamma - std_x)) / 2 + torch.mean(F.relu(gamma - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool, device=x.device)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


# --- float64: exact gradients ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 4), (2, 3), (5, 1)], ids=["n6-d4", "lead2x3-d4", "n2", "d1"])
def test_gradcheck_float64(backend_device, shape):
    z_a, z_b = make_pair(shape, device=backend_device[1])
    a, b = z_a.requires_grad_(), z_b.requires_grad_()
    # fast_mode (random projections of the Jacobian): a few forward calls instead of one per
    # element, which the Triton interpreter makes slow; the full gradients are compared below.
    assert torch.autograd.gradcheck(lambda a, b: vcreg_kernels.vicreg_loss(a, b, gamma=1.5, **COEFFS), (a, b),
                                    fast_mode=True)


@pytest.mark.parametrize("mean", [0.0, 100.0], ids=["mean0", "mean100"])
@pytest.mark.parametrize("shape", [(40, 12), (3, 8, 9)], ids=["n40-d12", "lead3x8-d9"])
def test_float64_matches_plain_autograd(backend_device, shape, mean):
    z_a, z_b = make_pair(shape, mean=mean, device=backend_device[1])
    loss, ga, gb = grads(vcreg_kernels.vicreg_loss, z_a, z_b, gamma=1.5, **COEFFS)
    want, wa, wb = grads(vicreg_loss_reference, z_a, z_b, gamma=1.5, **COEFFS)
    assert loss.dtype == torch.float64 and ga.shape == z_a.shape and gb.shape == z_b.shape
    assert abs(loss.item() - want.item()) <= 1e-12 * want.item()
    assert rel(ga, wa) < 1e-9 and rel(gb, wb) < 1e-9
    # facebookresearch/vicreg's own formula is the same loss
    assert abs(facebook_loss(z_a, z_b, gamma=1.5, **COEFFS).item() - want.item()) <= 1e-12 * want.item()


def test_strided_branches(backend_device):
    """A non-contiguous z_b (and z_a): the same gradients, in each branch's own layout."""
    z_a, z_b = make_pair((9, 20), device=backend_device[1])
    z_a, z_b = z_a.T.contiguous().T, z_b[:, ::2]  # column-major; every other column of a wider one
    z_a = z_a[:, :10]
    loss, ga, gb = grads(vcreg_kernels.vicreg_loss, z_a, z_b)
    want, wa, wb = grads(vicreg_loss_reference, z_a, z_b)
    assert rel(ga, wa) < 1e-9 and rel(gb, wb) < 1e-9
    assert ga.stride() == torch.empty_like(z_a).stride() and gb.stride() == torch.empty_like(z_b).stride()


def test_composed_halves_equal_the_fused_pair_kernels():
    """The default for a backend without pair kernels (its halves composed, ``dispatch.Backend``),
    run on the reference halves, against the reference backend's own pair kernels."""
    record = dispatch.backend("reference")
    assert record.pair_stats is reference.vicreg_pair_stats_reference
    z_a, z_b = (z.view(5, 8, 12).transpose(1, 2).contiguous() for z in make_pair((40, 12), mean=3.0))  # bdl
    want = record.run_pair_stats(z_a, z_b)
    got = reference.pair_stats_of_halves(record.stats, z_a, z_b)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    G = [torch.randn(12, 12, dtype=torch.float64) for _ in range(2)]
    args = (torch.tensor(3.0, dtype=torch.float64), z_a, z_b, G[0], want[0], G[1], want[2],
            torch.tensor(0.7, dtype=torch.float64))
    for w, g in zip(record.run_pair_apply(*args), reference.pair_apply_of_halves(record.apply, *args)):
        assert g.is_contiguous() and w.is_contiguous() and g.shape == w.shape == z_a.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_compiled_backends_have_pair_kernels(name):
    """Both keys of the compiled extension carry the pair ops (csrc/vcreg_cpu.cpp, csrc/cuda/vcreg_cuda.cu),
    and their records call them rather than composing the halves."""
    record = dispatch.backend(name)
    assert record.pair_stats is dispatch._compiled_pair_stats
    assert record.pair_apply is dispatch._compiled_pair_apply


def canonical_pair(B, d, L, dtype, mean=3.0, device="cpu"):
    """Two canonical (B, d, L) branches: rows (L == 1) or bdl."""
    z_a, z_b = make_pair((B, L, d), mean=mean)
    return tuple(z.transpose(1, 2).contiguous().to(device=device, dtype=dtype) for z in (z_a, z_b))


# (B, d, L): rows read in place (d % 16 == 0) and through the rows copy; bdl in place (L % 16 == 0)
# and through the copy; several column blocks of the stats and the apply (d > 128).
PAIR_SHAPES = {"rows": (40, 32, 1), "rows-copy": (37, 12, 1), "bdl": (3, 10, 16), "bdl-copy": (4, 9, 7),
               "rows-wide": (20, 130, 1)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", PAIR_SHAPES.values(), ids=PAIR_SHAPES.keys())
def test_triton_pair_kernels_equal_the_composition(shape, dtype):
    """The triton record has its own pair kernels, and they compute what its halves composed do
    (``reference.pair_stats_of_halves``, ``pair_apply_of_halves``), within the rule's bound of
    each against the float64 reference."""
    record = dispatch.backend("triton")
    assert record.pair_stats is not None and record.pair_apply is not None
    device = "cuda" if HAS_GPU else "cpu"
    za3, zb3 = canonical_pair(*shape, dtype, device=device)
    fused = record.run_pair_stats(za3, zb3)
    composed = reference.pair_stats_of_halves(record.stats, za3, zb3)
    want = reference.vicreg_pair_stats_reference(za3.double(), zb3.double())
    acc = reference.accumulate_dtype(dtype)
    assert [t.dtype for t in fused] == [acc] * 5 and fused[4].shape == () and fused[1].shape == (shape[1],) * 2
    for f, c, w, what in zip(fused, composed, want, ("mu_a", "M2_a", "mu_b", "M2_b", "invariance sum")):
        assert_within(rel(f, w), rel(c, w), "triton", dtype, device, f"{what}: fused against the composition")
    args = (pair_operands(za3, zb3)[0], za3, zb3, *pair_operands(za3, zb3)[1:])
    fused = record.run_pair_apply(*args)
    composed = reference.pair_apply_of_halves(record.apply, *args)
    want = reference.vicreg_pair_apply_reference(*(t.double() for t in args))
    for f, c, w, what in zip(fused, composed, want, ("grad_a", "grad_b")):
        assert f.dtype == dtype and f.shape == za3.shape and f.is_contiguous()
        floor = rel(w.to(dtype), w)  # the rounding to z's dtype, which no kernel avoids
        assert_within(rel(f, w), rel(c, w), "triton", dtype, device, f"{what}: fused against the composition",
                      floor=FLOOR["triton"][dtype] + floor)


@pytest.mark.parametrize("shape", [(300, 16, 1), (5, 9, 48)], ids=["rows", "bdl"])
def test_pair_kernels_bitwise_repeatable(backend_device, shape):
    """The same inputs give the same statistics and gradients, bit for bit (no atomics; fixed
    orders; the triton invariance sum here from 8 programs' partial sums)."""
    name, device = backend_device
    record = dispatch.backend(name)
    za3, zb3 = canonical_pair(*shape, torch.float32, mean=50.0, device=device)
    ops = pair_operands(za3, zb3)

    def run():
        return (*record.run_pair_stats(za3, zb3), *record.run_pair_apply(ops[0], za3, zb3, *ops[1:]))

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("shape", [(40, 32, 1), (37, 7, 1), (3, 7, 16)], ids=["rows", "rows-copy", "bdl"])
def test_pair_kernels_nonfinite_propagate(backend_device, shape):
    """A NaN in z_a reaches mu_a, its row and column of M2_a, the invariance sum, the whole row of
    grad_a (through G_a) and its own element of grad_b, as in the reference; an Inf in z_b makes the
    invariance sum Inf."""
    name, device = backend_device
    record = dispatch.backend(name)
    za3, zb3 = canonical_pair(*shape, torch.float32, device=device)
    ops = pair_operands(za3, zb3)
    za3[1, 2, 0] = float("nan")
    got = record.run_pair_stats(za3, zb3)
    want = reference.vicreg_pair_stats_reference(za3.double(), zb3.double())
    for g, w in zip(got, want):
        assert torch.equal(g.isnan().cpu(), w.isnan().cpu())
    assert got[4].isnan() and got[1].isnan().any() and not got[3].isnan().any()
    args = (ops[0], za3, zb3, *ops[1:])
    for g, w in zip(record.run_pair_apply(*args), reference.vicreg_pair_apply_reference(*args)):
        assert torch.equal(g.isnan().cpu(), w.isnan().cpu()) and g.isnan().any()
    za3[1, 2, 0] = 0.0
    zb3[0, 1, 0] = float("inf")
    assert record.run_pair_stats(za3, zb3)[4].isinf()


# --- float32, bfloat16, float16: SPEC section 6's bounds at |mu|/std = 100 --------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("sim_coeff", [25.0, 0.0], ids=["all-terms", "var-cov-only"])
def test_low_precision_mean100(backend_device, dtype, sim_coeff):
    name, device = backend_device
    coeffs = dict(sim_coeff=sim_coeff, std_coeff=25.0, cov_coeff=1.0)
    z_a, z_b = make_pair((4, 24, 32), dtype=dtype, mean=100.0, device=device)
    loss, ga, gb = grads(vcreg_kernels.vicreg_loss, z_a, z_b, gamma=1.5, **coeffs)
    want, wa, wb = grads(vicreg_loss_reference, z_a.double(), z_b.double(), gamma=1.5, **coeffs)
    _, pa, pb = grads(facebook_loss, z_a, z_b, gamma=1.5, **coeffs)  # plain PyTorch in this dtype
    assert ga.dtype == gb.dtype == dtype
    assert loss.dtype == torch.float32, "statistics and value in float32 for 16-bit input"
    assert abs(loss.item() - want.item()) <= spec_bound(dtype, name, device) * want.item()
    for z, got, plain, w in ((z_a, ga, pa, wa), (z_b, gb, pb, wb)):
        # Floors beyond the backend's: rounding the gradient to the dtype (no kernel does better),
        # and the apply's mu in float32 (SPEC section 2 allows it; autograd's demean cancels it).
        floor = FLOOR[name][dtype] + rel(w.to(dtype), w) + mean_rounding(z)
        err = rel(got, w)
        assert err <= spec_bound(dtype, name, device) + rel(w.to(dtype), w), f"relative error {err:.3g} over SPEC's bound"
        assert err <= MULTIPLE * rel(plain, w) + floor, f"{err:.3g} against plain PyTorch's {rel(plain, w):.3g}"


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in dispatch.available_backends("cpu")])
def test_float32_terms_of_a_wide_projector(backend):
    """float32 at d = 4096 (VICReg's projectors are 2048 to 8192 wide): the covariance term sums
    d^2 squares of M2, and every term stays within SPEC's float32 bound of its float64 value."""
    z_a, z_b = make_pair((64, 4096), dtype=torch.float32)
    want = reference.vicreg_terms_of(z_a.double(), z_b.double(), gamma=1.5)
    vcreg_kernels.set_backend(backend)
    try:
        got = vcreg_kernels.vicreg_terms(z_a, z_b, gamma=1.5)
    finally:
        vcreg_kernels.set_backend("auto")
    for name, g, w in zip(("inv", "var", "cov"), got.double(), want):
        assert abs(g - w) <= spec_bound(torch.float32, backend, "cpu") * abs(w), f"{name}: {g.item()} against {w.item()}"


def test_float16_with_a_loss_scale(backend_device):
    """float16 gradients under a GradScaler's 2^16: the ~1/(n d) parts must not underflow before
    the scale multiplies them."""
    z_a, z_b = make_pair((64, 48), dtype=torch.float16, mean=2.0, device=backend_device[1])
    S = 2.0**16
    scaled = lambda a, b: vcreg_kernels.vicreg_loss(a, b, gamma=1.5) * S  # noqa: E731
    _, ga, gb = grads(scaled, z_a, z_b)
    _, wa, wb = grads(lambda a, b: vicreg_loss_reference(a, b, gamma=1.5) * S, z_a.double(), z_b.double())
    assert ga.dtype == torch.float16
    for got, w in ((ga, wa), (gb, wb)):
        assert rel(got, w) < spec_bound(torch.float16, *backend_device) + rel(w.half(), w)


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_autocast_bfloat16(backend_device, backward_in_autocast):
    """Under autocast: the embeddings stay bf16, their gradients are bf16, the statistics float32."""
    device = backend_device[1]
    proj = nn.Linear(16, 32).to(device)
    x_a, x_b = torch.randn(256, 16, device=device), torch.randn(256, 16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        z_a, z_b = proj(x_a) + 3.0, proj(x_b) + 3.0
        assert z_a.dtype == torch.bfloat16
        a, b = z_a.detach().requires_grad_(), z_b.detach().requires_grad_()
        module = vcreg_kernels.VICRegLoss(gamma=1.5).to(device)
        loss = module(a, b)
        if backward_in_autocast:
            ga, gb = torch.autograd.grad(loss, (a, b))
    if not backward_in_autocast:
        ga, gb = torch.autograd.grad(loss, (a, b))
    assert loss.dtype == torch.float32 and ga.dtype == gb.dtype == torch.bfloat16
    want, wa, wb = grads(vicreg_loss_reference, a.double(), b.double(), gamma=1.5)
    for got, w in ((ga, wa), (gb, wb)):
        assert rel(got, w) < 2e-2 + rel(w.bfloat16(), w)
    # float32 statistics: a bf16 accumulation would be off by ~1e-2
    torch.testing.assert_close(module.terms.double(), reference.vicreg_terms_of(a.double(), b.double(), gamma=1.5),
                               rtol=1e-4, atol=1e-7)
    assert abs(loss.item() - want.item()) <= 1e-4 * want.item()


# --- the module, the terms, torch.compile -----------------------------------------------------


def test_terms():
    module = vcreg_kernels.VICRegLoss(**COEFFS, gamma=1.5)
    assert torch.isnan(module.terms).all() and "terms" not in module.state_dict()
    assert module.to(torch.bfloat16).terms.dtype == torch.float32
    buffer = module.terms
    z_a, z_b = make_pair((30, 10), dtype=torch.float32, mean=5.0)
    loss = module(z_a, z_b)
    want = reference.vicreg_terms_of(z_a.double(), z_b.double(), gamma=1.5)
    assert module.terms is buffer, "written in place: a reference taken once stays current"
    torch.testing.assert_close(module.terms.double(), want, rtol=1e-5, atol=1e-7)
    weights = torch.tensor([COEFFS["sim_coeff"], COEFFS["std_coeff"], COEFFS["cov_coeff"]])
    torch.testing.assert_close(loss, (weights * module.terms).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(vcreg_kernels.vicreg_terms(z_a, z_b, gamma=1.5), module.terms, rtol=1e-6, atol=0)
    assert "sim_coeff=20.0" in repr(module)
    module.to("meta")  # a buffer elsewhere than the embeddings: it follows them, no copy to another device
    module(z_a, z_b)
    assert module.terms.device == z_a.device and module.terms.dtype == torch.float32


class TwoViews(nn.Module):
    """An encoder and projector applied to two views, and the loss."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 24))
        self.loss = vcreg_kernels.VICRegLoss(gamma=1.5)

    def forward(self, x_a, x_b):
        return self.loss(self.encoder(x_a), self.encoder(x_b))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = TwoViews()
    compiled_model = TwoViews()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    x_a, x_b = torch.randn(32, 6), torch.randn(32, 6)

    def step(model, params):
        for p in params:
            p.grad = None
        loss = model(x_a, x_b)
        loss.backward()
        return loss.detach(), [p.grad for p in params]

    want, want_grads = step(eager, list(eager.parameters()))
    got, got_grads = step(compiled, list(compiled_model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # Relative to all gradients at once: some entries (the last bias's) are exactly 0 in the math,
    # as the loss does not change when both branches move together.
    scale = torch.cat([g.flatten() for g in want_grads]).norm()
    assert all((g - w).norm() < 1e-5 * scale for g, w in zip(got_grads, want_grads))
    torch.testing.assert_close(compiled_model.loss.terms, eager.loss.terms, rtol=1e-5, atol=1e-7)


def test_sync_without_a_process_group_is_local():
    """sync=True with no process group: the local batch's loss (as SyncBatchNorm); n < 2 is then
    checked in the forward, with the cross-rank mode's message."""
    z_a, z_b = make_pair((20, 6))
    local = grads(vcreg_kernels.vicreg_loss, z_a, z_b, **COEFFS)
    synced = grads(vcreg_kernels.vicreg_loss, z_a, z_b, sync=True, **COEFFS)
    torch.testing.assert_close(synced, local, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="n = 1 in all"):
        vcreg_kernels.vicreg_loss(torch.randn(1, 4), torch.randn(1, 4), sync=True)


def test_opcheck():
    z_a, z_b = make_pair((8, 5), dtype=torch.float32)
    torch.library.opcheck(torch.ops.vcreg.vicreg_forward.default, (z_a, z_b, 25.0, 25.0, 1.0, 1e-4, 1.0, None))
    out = torch.ops.vcreg.vicreg_forward(z_a, z_b, 25.0, 25.0, 1.0, 1e-4, 1.0, None)
    torch.library.opcheck(torch.ops.vcreg.vicreg_backward.default, (torch.tensor(2.0), z_a, z_b, *out[2:]))


# --- memory: d x d is G per branch, nothing else ----------------------------------------------


def _peak_bytes(fn):
    """Peak bytes allocated by torch's CPU allocator during ``fn()``, above what was allocated before.

    Blocks are matched by address: only what ``fn`` allocates counts, and its frees of them. A block
    allocated earlier and freed late by whatever held it (a reference cycle, a cache of the last
    call's arguments) may be freed inside the window; counted, it would lower the peak."""
    import gc
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    records = sorted((e["ts"], e["args"]["Ev Idx"], e["args"]["Addr"], e["args"]["Bytes"])
                     for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)
    live = {}
    running = peak = 0
    for _, _, addr, nbytes in records:
        if nbytes > 0:
            live[addr] = nbytes
        elif live.pop(addr, None) is None:
            continue  # allocated before the window
        running += nbytes
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in dispatch.available_backends("cpu")])
def test_dxd_memory_is_G_per_branch(backend):
    n, d = 64, 512  # d x d float32: 1 MiB; n x d: 128 KiB
    z_a, z_b = (z.requires_grad_() for z in make_pair((n, d), dtype=torch.float32))
    vcreg_kernels.set_backend(backend)
    try:
        vcreg_kernels.vicreg_loss(z_a, z_b).backward()  # warm up the allocator and the kernels' scratch
        z_a.grad = z_b.grad = None
        peak = _peak_bytes(lambda: vcreg_kernels.vicreg_loss(z_a, z_b).backward())
    finally:
        vcreg_kernels.set_backend("auto")
    dxd, nxd = 4 * d * d, 4 * n * d
    # G_a, G_b (M2_b while G_a exists), the two gradients and d-vectors; a third d x d temporary
    # would add 1 MiB. The reference's pair kernels also hold n x d temporaries (centred copies,
    # the invariance part); the cpu backend's none beyond the gradients (its panels are scratch
    # kept between calls, allocated by the warm-up).
    temporaries = {"reference": 6, "cpu": 0}[backend]
    assert peak < 2 * dxd + (2 + temporaries) * nxd + 64 * d, f"peak {peak / dxd:.2f} d x d, {peak / nxd:.2f} n x d"


# --- the cuda backend's pair kernels on a GPU ------------------------------------------------
# vcreg::pair_stats_kernel and pair_apply_kernel called directly on canonical (B, d, L) tensors,
# against the reference's pair kernels in float64. Sizes: rows and bdl; n = 2; rows and bdl runs
# of the apply in several blocks of samples (csrc/cuda/vcreg_cuda.cu's kPairScratchBytes); sample
# runs ending mid-tile.

PAIR_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PAIR_SIZES = [(2, 4, 1), (1031, 257, 1), (3000, 1000, 1), (20, 33, 7), (16, 130, 49), (64, 256, 196)]


def pair_size_id(size):
    return ("rows-" if size[2] == 1 else "bdl-") + "x".join(map(str, size))


def cuda_pair(size, dtype, mean=100.0):
    """conftest.make_pair3 of a (B, d, L) size on the GPU."""
    return make_pair3(*size, dtype, mean=mean, device="cuda")


def cuda_pair_operands(za3, zb3):
    """conftest.pair_operands with every hinge active and g a GradScaler's 2^16, or n d where that is
    less (the gradient's parts are ~1/(n d): g up to n d keeps them within float16)."""
    n, d = za3.shape[0] * za3.shape[2], za3.shape[1]
    return pair_operands(za3, zb3, g=min(2**16, n * d), gamma=None)


@pytest.mark.gpu
@pytest.mark.parametrize("size", PAIR_SIZES, ids=pair_size_id)
@pytest.mark.parametrize("dtype", PAIR_DTYPES, ids=dtype_id)
def test_cuda_pair_kernels_match_float64(dtype, size):
    """Both pair kernels at |mu|/std = 100 within conftest's rule (SPEC section 6's bounds): a
    multiple of the error of the reference's pair kernels run at the same dtype, plus the cuda floor."""
    za3, zb3 = cuda_pair(size, dtype)
    B, d, L = size
    acc = reference.accumulate_dtype(dtype)
    got = torch.ops.vcreg.pair_stats_kernel(za3, zb3)
    want = reference.vicreg_pair_stats_reference(za3.double(), zb3.double())
    plain = reference.vicreg_pair_stats_reference(za3, zb3)
    assert [t.dtype for t in got] == [acc] * 5 and got[4].shape == () and got[1].shape == (d, d)
    for k, z in ((0, za3), (2, zb3)):
        mu, M2 = got[k], got[k + 1]
        assert torch.equal(M2, M2.T), "M2 must be exactly symmetric"
        scale = want[k + 1].diagonal().sum().sqrt().item() / max(B * L - 1, 1) ** 0.5 + 1e-30
        fs = floor_scale(z, dtype)
        assert_within(rel_err(mu, want[k], scale), rel_err(plain[k], want[k], scale), "cuda", dtype, "cuda", "mu", fs)
        if want[k + 1].norm() > 0:
            assert_within(rel_err(M2, want[k + 1]), rel_err(plain[k + 1], want[k + 1]), "cuda", dtype, "cuda", "M2", fs)
    assert_within(rel_err(got[4], want[4]), rel_err(plain[4], want[4]), "cuda", dtype, "cuda", "invariance sum")

    ops = cuda_pair_operands(za3, zb3)
    g, G_a, mu_a, G_b, mu_b, c = ops
    grads = torch.ops.vcreg.pair_apply_kernel(g, za3, zb3, G_a, mu_a, G_b, mu_b, c)
    ops64 = [t.double() for t in ops]
    ref = reference.vicreg_pair_apply_reference(ops64[0], za3.double(), zb3.double(), *ops64[1:])
    plain = reference.vicreg_pair_apply_reference(g, za3, zb3, G_a, mu_a, G_b, mu_b, c)
    for k, (z, G, mu) in enumerate(((za3, G_a, mu_a), (zb3, G_b, mu_b))):
        assert grads[k].dtype == dtype and grads[k].shape == z.shape and grads[k].is_contiguous()
        # Relative to the covariance part g (Z - mu) G, as test_kernels' apply (the invariance part
        # is elementwise and would hide it).
        dX = reference.vcreg_apply_reference(torch.zeros_like(z, dtype=torch.float64), z.double(), G.double(),
                                             mu.double()) * ops64[0]
        scale = dX.norm().item()
        assert_within(rel_err(grads[k], ref[k], scale), rel_err(plain[k], ref[k], scale), "cuda", dtype, "cuda",
                      f"grad_{'ab'[k]}")


@pytest.mark.gpu
@pytest.mark.parametrize("size", [(3000, 1000, 1), (64, 256, 196)], ids=pair_size_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cuda_pair_kernels_bitwise_repeatable(dtype, size, monkeypatch):
    """SPEC section 8: no atomics, a fixed order in every reduction (the invariance sum's too)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    za3, zb3 = cuda_pair(size, dtype, mean=50.0)
    ops = cuda_pair_operands(za3, zb3)

    def run():
        return (*torch.ops.vcreg.pair_stats_kernel(za3, zb3),
                *torch.ops.vcreg.pair_apply_kernel(ops[0], za3, zb3, *ops[1:]))

    with deterministic():
        first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("size", [(300, 7, 1), (2, 40, 9)], ids=pair_size_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cuda_pair_kernels_nonfinite_propagates(dtype, size, bad):
    """NaN/Inf in z_a reach its column's statistics, the invariance sum and both gradients as the math says."""
    za3, zb3 = cuda_pair(size, dtype, mean=0.0)
    ops = cuda_pair_operands(za3, zb3)  # finite operands: the bad value enters through z_a only
    za3[1, 2, 0] = bad
    got = torch.ops.vcreg.pair_stats_kernel(za3, zb3)
    want = reference.vicreg_pair_stats_reference(za3.double(), zb3.double())
    for k in range(4):
        assert torch.equal(got[k].isfinite().cpu(), want[k].isfinite().cpu()), f"pair statistic {k}"
    assert not got[0][2].isfinite() and not got[4].isfinite()
    assert got[4].isnan().item() == want[4].isnan().item()
    grads = torch.ops.vcreg.pair_apply_kernel(ops[0], za3, zb3, *ops[1:])
    ref = reference.vicreg_pair_apply_reference(ops[0].double(), za3.double(), zb3.double(),
                                                *[t.double() for t in ops[1:]])
    for got_k, ref_k in zip(grads, ref):
        assert torch.equal(got_k.isnan().cpu(), ref_k.isnan().cpu())
        assert torch.equal(got_k.isfinite().cpu(), ref_k.isfinite().cpu()) and not got_k.isfinite().all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cuda_pair_apply_memory(dtype):
    """No n x d temporary beyond the two gradients: the apply's peak above its inputs is the
    gradients plus a bounded scratch (csrc/cuda/vcreg_cuda.cu: kPairScratchBytes of products per
    block), here an eighth of one gradient; the statistics hold one branch's shifted copy at a time."""
    n, d = 32768, 512
    za3, zb3 = cuda_pair((n, d, 1), dtype, mean=3.0)
    ops = cuda_pair_operands(za3, zb3)
    nxd, dxd = za3.numel() * za3.element_size(), 4 * d * d
    scratch = 8 << 20

    def peak(fn):
        fn()  # warm-up: cuBLAS handles and workspaces
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base

    apply_peak = peak(lambda: torch.ops.vcreg.pair_apply_kernel(ops[0], za3, zb3, *ops[1:]))
    # The gradients, the scratch, and for 16-bit the scaled G of each branch (d x d in z's dtype).
    assert apply_peak <= 2 * nxd + scratch + 4 * dxd + (1 << 20), f"{apply_peak / nxd:.3f} n x d"
    stats_peak = peak(lambda: torch.ops.vcreg.pair_stats_kernel(za3, zb3))
    # One shifted copy Y (n x d, z's dtype), Q and M2 of a branch and both returned M2s, d-vectors.
    assert stats_peak <= nxd + 4 * dxd + (1 << 20), f"{stats_peak / nxd:.3f} n x d"


@pytest.mark.gpu
@pytest.mark.parametrize("size", [(4096, 96, 1), (8, 64, 196)], ids=pair_size_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_cuda_pair_kernels_graph_capture(dtype, size):
    """No host synchronisation (g and c are read on the device): both pair kernels capture, and a
    replay on new data gives the eager result for that data."""
    za3, zb3 = cuda_pair(size, dtype, mean=20.0)
    ops = cuda_pair_operands(za3, zb3)

    def step():
        return (*torch.ops.vcreg.pair_stats_kernel(za3, zb3),
                *torch.ops.vcreg.pair_apply_kernel(ops[0], za3, zb3, *ops[1:]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_a, new_b = cuda_pair(size, dtype, mean=-5.0)
    za3.copy_(new_a)
    zb3.copy_(new_b)
    ops[0].fill_(3.0)  # g, read on the device at replay
    graph.replay()
    eager = step()
    for got, want in zip(captured, eager):
        # Same kernels, but cuBLAS may pick another algorithm inside a capture: not bitwise.
        assert rel_err(got, want) < 1e-6 if want.norm() > 0 else not got.any()


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in dispatch.available_backends("cpu")])
def test_pair_kernels_hold_no_nxd_temporary(backend):
    """SPEC section 9: no n x d temporary beyond the gradients. What the pair kernels allocate is
    measured at two batch sizes: as n grows by 4096 rows, the statistics' peak grows by less than
    half of one such n x d block, the apply's by the two gradients and less than half a block more
    (what does not grow with n: triton's partial tiles, a few 128 x 128 per program; the cpu
    backend's panels, scratch kept between calls and allocated by the warm-up)."""
    record = dispatch.backend(backend)
    peaks = []
    for n in (2048, 6144):
        za3, zb3 = canonical_pair(n, 16, 1, torch.float32)
        ops = pair_operands(za3, zb3)
        record.run_pair_stats(za3, zb3), record.run_pair_apply(ops[0], za3, zb3, *ops[1:])  # warm up
        peaks.append((_peak_bytes(lambda: record.run_pair_stats(za3, zb3)),
                      _peak_bytes(lambda: record.run_pair_apply(ops[0], za3, zb3, *ops[1:]))))
    block = 4 * 4096 * 16
    stats_growth, apply_growth = (peaks[1][k] - peaks[0][k] for k in range(2))
    assert stats_growth < block / 2, f"pair_stats peak grew by {stats_growth / block:.2f} n x d"
    assert apply_growth < 2.5 * block, f"pair_apply peak grew by {apply_growth / block:.2f} n x d (the gradients: 2)"


# --- bad input (SPEC section 5) ---------------------------------------------------------------

ENTRY = {
    "vicreg_loss": lambda a, b, **kw: vcreg_kernels.vicreg_loss(a, b, **kw),
    "VICRegLoss": lambda a, b, **kw: vcreg_kernels.VICRegLoss(**kw)(a, b),
    "vicreg_terms": lambda a, b, **kw: vcreg_kernels.vicreg_terms(
        a, b, **{k: v for k, v in kw.items() if k in ("eps", "gamma")}),
}


@pytest.fixture(params=list(ENTRY))
def call(request):
    return ENTRY[request.param]


def test_branches_of_different_shapes(call):
    with pytest.raises(ValueError, match=r"z_a of shape \(8, 5\) and z_b of shape \(8, 6\)"):
        call(torch.randn(8, 5), torch.randn(8, 6))


def test_non_floating_and_mixed_dtypes(call):
    with pytest.raises(TypeError, match="torch.int64"):
        call(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.float32 and torch.float64"):
        call(torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 5), (5,), (0, 4), (1, 1, 3)])
def test_fewer_than_two_samples(call, shape):
    n = torch.Size(shape).numel() // shape[-1]
    with pytest.raises(ValueError, match=rf"n = {n} for z_a and z_b of shape {tuple(shape)}".replace("(", r"\(")
                       .replace(")", r"\)")):
        call(torch.randn(shape), torch.randn(shape))


def test_empty_feature_dimension_and_zero_dim(call):
    with pytest.raises(ValueError, match="d = 0"):
        call(torch.randn(5, 0), torch.randn(5, 0))
    with pytest.raises(IndexError):
        call(torch.tensor(1.0), torch.tensor(2.0))


@pytest.mark.parametrize("name,value", [("eps", 0.0), ("eps", -1e-4), ("eps", float("nan")), ("sim_coeff", -1.0),
                                        ("std_coeff", -0.5), ("cov_coeff", -1e-3), ("gamma", float("inf"))])
def test_bad_hyperparameters(name, value):
    for fn in (ENTRY["vicreg_loss"], ENTRY["VICRegLoss"]):
        with pytest.raises(ValueError, match=rf"{name} must be .*{value}"):
            fn(torch.randn(6, 3), torch.randn(6, 3), **{name: value})
