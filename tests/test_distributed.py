"""The cross-rank mode (SPEC section 8), with gloo on the CPU.

Each case spawns its ranks once (torch.multiprocessing.spawn, a file:// rendezvous in tmp_path)
and runs several scenarios in them; the ranks write their results to files, and this process
compares them with a single process's gradients on the concatenated batch, computed with plain
autograd (the mean cross-entropy plus ``vcreg_loss`` of each regularised activation). The
contract: under DDP, which averages gradients, the parameter gradients equal those, whatever
the ranks' local batch sizes (one may be empty), at a feature mean 100x the spread. The same for
the VICReg loss (``vicreg_loss(..., sync=True)``): one process's gradients of the loss of the
concatenated batch, within 1e-9 relative in float64, its embeddings never gathered.
"""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import vcreg_kernels
from vcreg_kernels import VCReg, dispatch, reference

BACKENDS = dispatch.available_backends("cpu")  # the op-level scenarios run on each
PARAMS = dict(alpha=0.8, beta=0.5, eps=1e-4, gamma=2.0, delta=None)  # gamma 2: every column's hinge active
MEAN = 100.0  # added to the regularised features, whose spread is about 1


class ConvBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, h):
        return h + torch.relu(self.conv(h))


class MLPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.lin(h))


class Net(nn.Module):
    """VCReg goes after the two blocks: an NCHW map (n = batch * 16, dim=1) and features (n = batch, dim=-1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_block = ConvBlock(6)
        self.fc = nn.Linear(6, 10)
        self.mlp_block = MLPBlock(10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = self.conv_block(self.stem(x) + MEAN)
        h = self.fc(h.mean((2, 3)) - MEAN) + MEAN
        return self.head(self.mlp_block(h) - MEAN)


def _net():
    torch.manual_seed(0)
    return Net().double()


def _batch(sizes):
    """The concatenated batch of every rank, the same in every process."""
    g = torch.Generator().manual_seed(sum(sizes))
    n = sum(sizes)
    return torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _reference(sizes):
    """(parameter gradients, {block: [l_var, l_cov]}, supervised-only gradients) of one process on
    the whole batch in float64, plain autograd."""
    net = _net()
    acts = {}
    for name in ("conv_block", "mlp_block"):
        getattr(net, name).register_forward_hook(lambda m, i, out, name=name: acts.__setitem__(name, out))
    x, y = _batch(sizes)
    loss = F.cross_entropy(net(x), y)
    sup = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    dims = {"conv_block": 1, "mlp_block": -1}
    loss = loss + sum(vcreg_kernels.vcreg_loss(acts[k], dim=dims[k], **PARAMS) for k in acts)
    net.zero_grad()
    loss.backward()
    terms = {k: _terms(acts[k], dims[k]) for k in acts}
    return {n: p.grad for n, p in net.named_parameters()}, terms, dict(zip(dict(net.named_parameters()), sup))


def _terms(x, dim):
    return torch.stack(vcreg_kernels.reference.vcreg_terms_of(
        x.detach().double(), PARAMS["eps"], PARAMS["gamma"], PARAMS["delta"], dim % x.dim()))


def _activations(sizes, shape):
    """(x, grad_y) of the whole batch for the op-level scenarios (float64; the ranks run float32):
    mean 100x the spread."""
    g = torch.Generator().manual_seed(sum(sizes))
    n = sum(sizes)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64) + MEAN
    return x, torch.randn(n, *shape, generator=g, dtype=torch.float64) * 1e-2


def _run_model(rank, world, sizes, how):
    """Model level: the parameter gradients of a DDP-wrapped model with sync VCReg layers."""
    net = _net()
    blocks = [ConvBlock, MLPBlock]
    if how == "insert-sync":  # sync from the start, inserted into the DDP-wrapped model
        model = nn.parallel.DistributedDataParallel(net)
        vcreg_kernels.insert_vcreg(model, **PARAMS, block_types=blocks, sync=True)
    else:  # inserted locally, then DDP, then switched to the cross-rank mode
        vcreg_kernels.insert_vcreg(net, **PARAMS, block_types=blocks)
        model = vcreg_kernels.convert_sync_vcreg(nn.parallel.DistributedDataParallel(net))
        if how == "compile":  # aot_eager: AOTAutograd's graphs (and DDP's graph splits), not codegen
            model = torch.compile(model, backend="aot_eager")
    x, y = _batch(sizes)
    lo = sum(sizes[:rank])
    x, y = x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]
    # The local share of the global mean loss, times the world size that DDP's average divides by.
    loss = F.cross_entropy(model(x), y, reduction="sum") * world / sum(sizes)
    try:
        loss.backward()
    except ValueError as e:
        return {"error": str(e)}
    terms = {k.removesuffix(".vcreg"): v for k, v in vcreg_kernels.vcreg_terms(model).items()}
    return {"grads": {n: p.grad.clone() for n, p in net.named_parameters()}, "terms": terms}


def _run_op(rank, world, sizes, shape, dim, backend):
    """Op level, float32: grad_x of this rank's rows through a sync VCReg layer (no DDP) on ``backend``."""
    x, gy = _activations(sizes, shape)
    lo = sum(sizes[:rank])
    x = x[lo:lo + sizes[rank]].float().requires_grad_()
    layer = VCReg(**PARAMS, dim=dim, sync=True)
    vcreg_kernels.set_backend(backend)
    try:
        layer(x).backward(gy[lo:lo + sizes[rank]].float())
    finally:
        vcreg_kernels.set_backend("auto")
    return {"grad": x.grad, "terms": layer.terms}


def _run_paper(rank, world, sizes, backend):
    """Op level, float64: a sync layer with scale="paper" (beta * (n - 1), n the group's)."""
    x, gy = _activations(sizes, (6,))
    lo = sum(sizes[:rank])
    x = x[lo:lo + sizes[rank]].clone().requires_grad_()
    layer = VCReg(**PARAMS, sync=True, scale="paper")
    vcreg_kernels.set_backend(backend)
    try:
        layer(x).backward(gy[lo:lo + sizes[rank]])
    finally:
        vcreg_kernels.set_backend("auto")
    return {"grad": x.grad}


# --- the VICReg loss -------------------------------------------------------------------------

LOSS = dict(sim_coeff=20.0, std_coeff=30.0, cov_coeff=2.0, gamma=2.0)


class TwoViewEncoder(nn.Module):
    """Both views through one encoder in one forward (one DDP call); features of mean 100."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 12)
        self.b = nn.Linear(12, 7)

    def forward(self, x_a, x_b):
        z = self.b(torch.tanh(self.a(torch.cat([x_a, x_b])))) + MEAN
        return z[: len(x_a)], z[len(x_a):]


def _views(sizes):
    """The two views of the concatenated batch, the same in every process."""
    g = torch.Generator().manual_seed(100 + sum(sizes))
    x_a = torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64)
    return x_a, x_a + 0.3 * torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64)


def _loss_encoder():
    torch.manual_seed(3)
    return TwoViewEncoder().double()


def _run_loss(rank, world, sizes):
    """Model level: a DDP-wrapped encoder trained with vicreg_loss(sync=True) on this rank's rows."""
    model = nn.parallel.DistributedDataParallel(_loss_encoder())
    x_a, x_b = _views(sizes)
    lo = sum(sizes[:rank])
    module = vcreg_kernels.VICRegLoss(**LOSS, sync=True)
    loss = module(*model(x_a[lo:lo + sizes[rank]], x_b[lo:lo + sizes[rank]]))
    loss.backward()
    return {"grads": {n: p.grad.clone() for n, p in model.module.named_parameters()}, "loss": loss.detach(),
            "terms": module.terms.clone()}


def _run_loss_op(rank, world, sizes, backend):
    """Op level, float64: this rank's embeddings' gradients on ``backend``."""
    z_a, z_b = _loss_embeddings(sizes)
    lo = sum(sizes[:rank])
    z_a, z_b = (z[lo:lo + sizes[rank]].clone().requires_grad_() for z in (z_a, z_b))
    vcreg_kernels.set_backend(backend)
    try:
        loss = vcreg_kernels.vicreg_loss(z_a, z_b, **LOSS, sync=True)
        loss.backward()
    finally:
        vcreg_kernels.set_backend("auto")
    return {"grads": (z_a.grad, z_b.grad), "loss": loss.detach()}


def _loss_embeddings(sizes):
    g = torch.Generator().manual_seed(200 + sum(sizes))
    z_a = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 6) + MEAN
    return z_a, z_a + 0.5 * torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64)


_RUNS = {"model": _run_model, "op": _run_op, "paper": _run_paper, "loss": _run_loss, "loss-op": _run_loss_op}


def _worker(rank, world, path, scenarios):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/pg", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for name, run, *args in scenarios:
            try:
                result = _RUNS[run](rank, world, *args)
            except ValueError as e:  # the "too few samples" scenarios: every rank must raise it
                result = {"error": str(e)}
            torch.save(result, os.path.join(path, f"{name}-{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world, scenarios, timeout=120):
    """Run the scenarios on ``world`` ranks; fail (and kill them) if they have not finished in ``timeout`` s."""
    ctx = mp.spawn(_worker, args=(world, str(tmp_path), scenarios), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {timeout} s: a deadlock")
    return {s[0]: [torch.load(tmp_path / f"{s[0]}-{r}.pt") for r in range(world)] for s in scenarios}


def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _check(scenario, results):
    """Each rank's result against one process's on the whole batch (float64 plain autograd)."""
    name, run, sizes, *args = scenario
    for rank, res in enumerate(results):
        assert "error" not in res, (name, rank, res)
    if run in ("paper", "loss", "loss-op"):
        return _check_new(scenario, results)
    if run == "model":
        want, want_terms, sup = _reference(sizes)
        # The regulariser must matter, or the comparison would not test it.
        assert sum((want[k] - sup[k]).norm() for k in want) > 0.1 * sum(want[k].norm() for k in want)
        for rank, res in enumerate(results):
            for k in want:
                err = _rel_err(res["grads"][k], want[k])
                assert err < 1e-10, f"{name}: rank {rank}, gradient of {k}: relative error {err:.3g}"
    else:
        shape, dim, _backend = args
        x, gy = _activations(sizes, shape)
        x.requires_grad_()
        (reg,) = torch.autograd.grad(vcreg_kernels.vcreg_loss(x, dim=dim, **PARAMS), x)
        want_terms = {"layer": _terms(x, dim)}
        bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        world = len(sizes)
        for rank, res in enumerate(results):
            lo, hi = bounds[rank], bounds[rank + 1]
            # This rank's rows get W times the whole batch's regulariser gradient (module docstring).
            want_reg = world * reg[lo:hi]
            if hi > lo:
                err = ((res["grad"].double() - gy[lo:hi] - want_reg).norm() / want_reg.norm()).item()
                assert err < 1e-4, f"{name}: rank {rank}: relative error {err:.3g}"  # SPEC section 6, float32
        results = [{"terms": {"layer": res["terms"]}} for res in results]
    # The whole batch's terms, on every rank: float64 kept in a float32 buffer, or float32 input.
    rtol = 1e-6 if run == "model" else 1e-4
    for rank, res in enumerate(results):
        assert set(res["terms"]) == set(want_terms)
        for k in want_terms:
            torch.testing.assert_close(res["terms"][k].double(), want_terms[k], rtol=rtol, atol=0)


def test_two_ranks(tmp_path):
    scenarios = [
        ("unequal", "model", [5, 3], "convert"),
        ("empty-rank", "model", [0, 6], "insert-sync"),
        ("compiled", "model", [2, 5], "compile"),
        *[(f"tokens-f32-{b}", "op", [7, 3], (5, 12), -1, b) for b in BACKENDS],
        *[(f"nchw-f32-{b}", "op", [2, 1], (8, 3, 5), 1, b) for b in BACKENDS],
        ("paper", "paper", [5, 4], "auto"),
        ("loss-unequal", "loss", [5, 3]),
        ("loss-empty-rank", "loss", [0, 6]),
        *[(f"loss-op-{b}", "loss-op", [7, 2], b) for b in BACKENDS],
        ("too-few", "model", [1, 0], "convert"),  # the MLP features: n = 1 over both ranks
        ("loss-too-few", "loss", [0, 1]),
    ]
    results = _spawn(tmp_path, 2, scenarios)
    for scenario in scenarios[:-2]:
        _check(scenario, results[scenario[0]])
    for res in results["too-few"]:  # every rank raises the same error; none hangs
        assert "n = 1 in all" in res.get("error", ""), res
    for res in results["loss-too-few"]:  # raised by the loss's forward, at call time
        assert "vicreg_loss: needs at least 2 samples over the process group, got n = 1 in all" in res.get("error", "")


def test_three_ranks(tmp_path):
    scenarios = [
        ("one-sample-rank", "model", [4, 1, 6], "insert-sync"),
        ("empty-and-one", "model", [0, 1, 3], "convert"),
        ("tokens-f32", "op", [40, 0, 1], (16,), -1, "auto"),
        ("paper-empty-rank", "paper", [3, 0, 4], "auto"),
        ("loss-empty-and-one", "loss", [4, 0, 1]),
        ("loss-op-empty", "loss-op", [0, 5, 3], "auto"),
    ]
    results = _spawn(tmp_path, 3, scenarios)
    for scenario in scenarios:
        _check(scenario, results[scenario[0]])


def test_sync_without_a_process_group_is_local():
    """sync=True with no process group: the local batch, as without sync (SyncBatchNorm does the same)."""
    assert not dist.is_initialized()
    x = torch.randn(32, 7, dtype=torch.float64) + MEAN
    grads = []
    for sync in (False, True):
        layer = VCReg(**PARAMS, sync=sync)
        xs = x.clone().requires_grad_()
        layer(xs).sum().backward()
        grads.append((xs.grad, layer.terms))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="n = 1 in all"):  # the check moves to the backward
        VCReg(sync=True)(torch.randn(1, 4, requires_grad=True)).sum().backward()


def _check_new(scenario, results):
    """The scale="paper" and VICReg-loss scenarios: float64 throughout, so within 1e-9 relative."""
    name, run, sizes, *args = scenario
    world, n = len(sizes), sum(sizes)
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    if run == "paper":  # beta * (n - 1) with the group's n, W times on each rank's rows
        x, gy = _activations(sizes, (6,))
        x.requires_grad_()
        (reg,) = torch.autograd.grad(vcreg_kernels.vcreg_loss(x, **{**PARAMS, "beta": PARAMS["beta"] * (n - 1)}), x)
        for rank, res in enumerate(results):
            lo, hi = bounds[rank], bounds[rank + 1]
            if hi > lo:
                err = _rel_err(res["grad"] - gy[lo:hi], world * reg[lo:hi])
                assert err < 1e-9, f"{name}: rank {rank}: relative error {err:.3g}"
        return
    if run == "loss":
        model = _loss_encoder()
        loss = reference.vicreg_loss_reference(*model(*_views(sizes)), **LOSS)
        loss.backward()
        want = {k: p.grad for k, p in model.named_parameters()}
        # Against all gradients at once: the last bias's is 0 in the math (the loss does not change
        # when both views move together), so its own relative error is rounding over rounding.
        scale = torch.cat([w.flatten() for w in want.values()]).norm()
        for rank, res in enumerate(results):
            for k in want:
                err = ((res["grads"][k] - want[k]).norm() / scale).item()
                assert err < 1e-9, f"{name}: rank {rank}, gradient of {k}: relative error {err:.3g}"
            torch.testing.assert_close(res["terms"].double(),
                                       reference.vicreg_terms_of(*model(*_views(sizes)), gamma=LOSS["gamma"]).detach(),
                                       rtol=1e-6, atol=1e-9)  # float64 kept in a float32 buffer
    else:
        z_a, z_b = (z.requires_grad_() for z in _loss_embeddings(sizes))
        loss = reference.vicreg_loss_reference(z_a, z_b, **LOSS)
        want = torch.autograd.grad(loss, (z_a, z_b))
        for rank, res in enumerate(results):
            lo, hi = bounds[rank], bounds[rank + 1]
            assert res["grads"][0].shape == (hi - lo, 6)
            if hi > lo:
                for got, w in zip(res["grads"], want):
                    err = _rel_err(got, world * w[lo:hi])  # W times the group's loss gradient (DDP averages)
                    assert err < 1e-9, f"{name}: rank {rank}: relative error {err:.3g}"
    for rank, res in enumerate(results):  # the value: the whole batch's, on every rank
        assert abs(res["loss"].item() - loss.item()) <= 1e-12 * loss.item(), (name, rank)
