"""What only the cpu backend has (csrc/vcreg_cpu.cpp): its plans, chosen by n, d and delta,
results independent of the thread count, and scratch memory kept between calls; and its VICReg
pair kernels (the other backends compose their halves). Its kernels are tested with every
backend's in test_kernels.py, through the op in test_backends.py, and through the loss in
test_vicreg.py.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import (assert_within, dtype_id, floor_scale, gamma_between, make_pair3, make_x3, pair_operands,
                      rel_err)
from vcreg_kernels import _extension
from vcreg_kernels._params import Params
from vcreg_kernels.reference import (accumulate_dtype, vcreg_backward_reference,
                                     vcreg_stats_reference, vicreg_pair_apply_reference, vicreg_pair_stats_reference)

# Only a build that opted out of the extension may go without these kernels: anywhere else a
# missing CPU kernel must fail these tests, not skip them.
pytestmark = pytest.mark.skipif(
    os.environ.get("VCREG_NO_EXTENSION") == "1" and not _extension.has_kernel("cpu"),
    reason="built with VCREG_NO_EXTENSION=1",
)

# (B, d, L) that reach every plan: per-task sample ranges ("grouped", d < 128 with large n:
# 8195 x 3, 8 x 96 x 1300, 3 x 100 x 2800), one centred panel of every sample ("panel": d = 257 with tiles of uneven
# width, sample counts that leave remainders in every block, bdl runs across slab boundaries, a
# 12000-sample panel), and the backward's "dual" plan (delta None and n <= d: products with
# Xc Xc^T) in each layout; with a delta those take the panel plan.
SPLITS = [(1031, 257, 1), (8195, 3, 1), (3000, 96, 1), (3, 257, 37), (5, 96, 613), (16, 130, 49), (8, 96, 1300),
          (3, 100, 2800), (4, 160, 3000), (150, 300, 1), (3, 300, 49), (7, 1100, 37)]


def split_id(size):
    return ("rows-" if size[2] == 1 else "bdl-") + "x".join(map(str, size))


@pytest.mark.parametrize("size", SPLITS, ids=split_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("mean", [0.0, 1000.0])
@pytest.mark.parametrize("delta,gamma", [(None, 4.0), (0.05, 1.5)])
def test_work_splits(size, dtype, mean, delta, gamma):
    # bfloat16 takes bfloat16 operands where the CPU multiplies bfloat16 natively (AVX512-BF16,
    # AMX; every plan but the dual), float32 operands elsewhere.
    x3 = make_x3(*size, dtype, mean)
    fs = floor_scale(x3, dtype)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    _, M2_pt = vcreg_stats_reference(x3)
    assert torch.equal(M2, M2.T)
    assert_within(rel_err(M2, M2_ref), rel_err(M2_pt, M2_ref), "cpu", dtype, "cpu", "M2", fs)
    if dtype == torch.bfloat16:
        # bfloat16 operands put M2's diagonal within about 1e-3 of its value, so an s_j that close
        # to gamma would make the test a coin flip of the hinge's jump (at mean 1000 bfloat16 rounds
        # these spread-1 features to a few values each, and some s_j land near 4): such a gamma
        # moves to the widest gap between the s_j.
        s = (M2_ref.diagonal() / (x3.shape[0] * x3.shape[2] - 1) + 1e-4).sqrt()
        if ((s - gamma).abs() < 1e-2 * gamma).any():
            gamma = gamma_between(s)
    params = Params(0.7, 0.3, 1e-4, gamma, delta)
    reg, terms_ref = vcreg_backward_reference(torch.zeros_like(x3, dtype=torch.float64), x3.double(), params)
    gy3 = (torch.randn(x3.shape, dtype=torch.float64) * reg.std()).to(dtype)
    gx, terms = torch.ops.vcreg.backward_kernel(gy3, x3, *params.values())
    ref, _ = vcreg_backward_reference(gy3.double(), x3.double(), params)
    plain, _ = vcreg_backward_reference(gy3, x3, params)
    scale = reg.norm().item()
    assert_within(rel_err(gx, ref, scale), rel_err(plain, ref, scale), "cpu", dtype, "cpu", "grad_x", fs)
    assert torch.allclose(terms.double(), terms_ref, rtol=1e-5 if dtype != torch.bfloat16 else 2e-3, atol=0)


@pytest.mark.parametrize("size", [(30000, 300, 1), (12, 300, 2500)], ids=split_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_stats_across_super_panels(size, dtype):
    # d > 256 and n * d * 4 bytes = 36 MB, past the 32 MiB panel, take the streamed plan: five
    # 8 MiB super-panels whose float64 sums are merged (bfloat16: the same plan, its super-panels
    # gathered in bfloat16).
    x3 = make_x3(*size, dtype, mean=300.0)
    mu, M2 = torch.ops.vcreg.stats_kernel(x3)
    mu_ref, M2_ref = vcreg_stats_reference(x3.double())
    mu_pt, M2_pt = vcreg_stats_reference(x3)
    assert (mu.double() - mu_ref).abs().max() <= 4 * (mu_pt.double() - mu_ref).abs().max() + 1e-6
    assert_within(rel_err(M2, M2_ref), rel_err(M2_pt, M2_ref), "cpu", dtype, "cpu", "M2")


PLANS = {"rows-grouped": (20000, 100, 1), "bdl-grouped": (8, 96, 1300), "rows-grouped-past-panel": (70000, 130, 1),
         "rows-streamed": (30000, 300, 1), "bdl-panel": (16, 384, 196), "rows-panel": (3000, 200, 1),
         "bdl-panel-large-n": (4, 256, 3136), "bdl-panel-narrow": (4, 150, 1000), "rows-dual": (200, 768, 1),
         "bdl-dual": (4, 1024, 49)}


def assert_same_at_any_thread_count(run):
    """run() gives bitwise the same outputs twice, and at 1, 3 and 8 threads (more threads than
    cores is fine: the kernels' split of the work must not depend on the count)."""
    first, second = run(), run()
    threads = torch.get_num_threads()
    others = []
    try:
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            others.append(run())
    finally:
        torch.set_num_threads(threads)
    for outputs in [second] + others:
        for a, b in zip(first, outputs):
            assert torch.equal(a, b)


@pytest.mark.parametrize("size", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("delta", [None, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_bitwise_repeatable_and_thread_count_independent(size, delta, dtype):
    x3 = make_x3(*size, dtype, mean=50.0)
    gy3 = torch.randn(x3.shape).to(dtype)
    args = (0.5, 0.2, 1e-4, 2.0, delta)

    def run():
        return (*torch.ops.vcreg.stats_kernel(x3), *torch.ops.vcreg.backward_kernel(gy3, x3, *args))

    assert_same_at_any_thread_count(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("size", [(4, 9, 33), (2, 40, 9)], ids=["panel", "dual"])
def test_outputs_do_not_share_scratch(dtype, size):
    # The kernels keep per-thread scratch between calls; nothing they return may live in it.
    x_a, x_b = (make_x3(*size, dtype) for _ in range(2))
    mu_a, M2_a = torch.ops.vcreg.stats_kernel(x_a)
    gx_a, terms_a = torch.ops.vcreg.backward_kernel(x_a, x_a, 0.5, 0.2, 1e-4, 2.0, None)
    kept = [t.clone() for t in (mu_a, M2_a, gx_a, terms_a)]
    torch.ops.vcreg.stats_kernel(x_b)
    torch.ops.vcreg.backward_kernel(x_b, x_b, 0.5, 0.2, 1e-4, 2.0, None)
    for t, k in zip((mu_a, M2_a, gx_a, terms_a), kept):
        assert torch.equal(t, k)



def test_grad_x_memory_comes_back_for_the_next_call():
    # grad_x takes the memory of a freed grad_x of its size (no fresh pages to fault in), never
    # that of one still alive, and the profiler sees it as it sees the CPU allocator's.
    x3, gy3 = make_x3(4, 24, 50, torch.float32), make_x3(4, 24, 50, torch.float32)
    args = (0.5, 0.2, 1e-4, 2.0, None)
    want = torch.ops.vcreg.backward_kernel(gy3, x3, *args)[0].clone()
    first = torch.ops.vcreg.backward_kernel(gy3, x3, *args)[0]
    second = torch.ops.vcreg.backward_kernel(gy3, x3, *args)[0]
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, want) and torch.equal(second, want)
    ptr = second.data_ptr()
    del second
    other = torch.empty_like(want)  # the C allocator would hand it the block just freed
    third = torch.ops.vcreg.backward_kernel(gy3, x3, *args)[0]
    assert third.data_ptr() == ptr and other.data_ptr() != ptr and torch.equal(third, want)
    del third
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fourth = torch.ops.vcreg.backward_kernel(gy3, x3, *args)[0]
        del fourth
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert want.nbytes in sizes and -want.nbytes in sizes

# --- the VICReg pair kernels (vcreg::pair_stats_kernel, pair_apply_kernel) ----------------------
# Against the reference backend's pair kernels, which state their semantics. (B, d, L) reaching
# every plan: the pair panel (both branches gathered at once; d < 128 where grouped does not
# apply, uneven tiles, bdl runs across slabs), and branch by branch with a separate invariance
# pass: the panel plan where the two panels together pass kPanelMaxBytes (float32: 5 x 1100 x 900),
# grouped (rows, bdl) and streamed; the apply of those last three takes two panels (the bdl ones
# split a slab).
PAIR_SPLITS = [(300, 37, 1), (1031, 257, 1), (3, 257, 37), (16, 130, 49), (5, 1100, 900), (20000, 100, 1),
               (8, 96, 1300), (30000, 300, 1), (13, 300, 2500), (2, 1, 3)]


@pytest.mark.parametrize("size", PAIR_SPLITS, ids=split_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_pair_kernels_match_the_reference(size, dtype):
    za3, zb3 = make_pair3(*size, dtype, mean=100.0)
    n = size[0] * size[2]
    acc = accumulate_dtype(dtype)
    fs = floor_scale(za3, dtype)
    got = torch.ops.vcreg.pair_stats_kernel(za3, zb3)
    want = vicreg_pair_stats_reference(za3.double(), zb3.double())
    plain = vicreg_pair_stats_reference(za3, zb3)
    assert [t.dtype for t in got] == [acc] * 5 and got[4].shape == ()
    assert torch.equal(got[1], got[1].T) and torch.equal(got[3], got[3].T)
    for i, what in ((0, "mu_a"), (2, "mu_b")):
        # mu on the spread's scale (a relative error against |mu| = 100 would hide it)
        scale = want[i + 1].diagonal().sum().sqrt().item() / max(n - 1, 1) ** 0.5
        assert_within(rel_err(got[i], want[i], scale), rel_err(plain[i], want[i], scale), "cpu", dtype, "cpu", what, fs)
    for i, what in ((1, "M2_a"), (3, "M2_b"), (4, "invariance sum")):
        assert_within(rel_err(got[i], want[i]), rel_err(plain[i], want[i]), "cpu", dtype, "cpu", what, fs)
    # The apply with mu in the accumulate dtype (as the loss passes it) and, for float32, in
    # float64: the shift is mu rounded to float32 and the rounding's image corrected.
    for mu_dtype in [acc] + ([torch.float64] if dtype == torch.float32 else []):
        ops = pair_operands(za3, zb3, mu_dtype=mu_dtype)
        args = (ops[0], za3, zb3, *ops[1:])
        ga, gb = torch.ops.vcreg.pair_apply_kernel(*args)
        wa, wb = vicreg_pair_apply_reference(*(t.double() for t in args))
        pa, pb = vicreg_pair_apply_reference(*(t.to(acc) if t.dtype == torch.float64 else t for t in args))
        for got_g, w, p, what in ((ga, wa, pa, "grad_a"), (gb, wb, pb, "grad_b")):
            assert got_g.dtype == dtype and got_g.shape == za3.shape and got_g.is_contiguous()
            assert_within(rel_err(got_g, w), rel_err(p, w), "cpu", dtype, "cpu", f"{what} (mu {mu_dtype})", fs)


PAIR_PLANS = {"rows-panel": (256, 512, 1), "bdl-panel": (16, 130, 49), "rows-panel-by-branch": (4500, 1100, 1),
              "rows-grouped": (20000, 100, 1),
              "bdl-grouped": (8, 96, 1300), "rows-streamed": (30000, 300, 1), "bdl-streamed": (13, 300, 2500)}


@pytest.mark.parametrize("size", PAIR_PLANS.values(), ids=PAIR_PLANS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_pair_kernels_bitwise_repeatable_and_thread_count_independent(size, dtype):
    za3, zb3 = make_pair3(*size, dtype, mean=50.0)
    ops = pair_operands(za3, zb3, mu_dtype=torch.float32)

    def run():
        return (*torch.ops.vcreg.pair_stats_kernel(za3, zb3), *torch.ops.vcreg.pair_apply_kernel(ops[0], za3, zb3, *ops[1:]))

    assert_same_at_any_thread_count(run)


_VECTOR_LOOPS_CHILD = """
import sys, torch, vcreg_kernels
cases = torch.load(sys.argv[1])
out = []
for kind, tensors, args in cases:
    if kind == "layer":
        x3, gy3 = tensors
        out.append((*torch.ops.vcreg.stats_kernel(x3), *torch.ops.vcreg.backward_kernel(gy3, x3, *args)))
    elif kind == "apply":
        out.append((torch.ops.vcreg.apply_kernel(*tensors),))
    else:
        za3, zb3, ops = tensors
        out.append((*torch.ops.vcreg.pair_stats_kernel(za3, zb3),
                    *torch.ops.vcreg.pair_apply_kernel(ops[0], za3, zb3, *ops[1:])))
torch.save(out, sys.argv[2])
"""


def _run_vector_and_portable(cases, tmp_path):
    """The outputs of ``cases`` (see _VECTOR_LOOPS_CHILD) in two child processes: as is, and with
    ATEN_CPU_CAPABILITY=default, which turns the kernels' AVX-512 code off as it does ATen's."""
    torch.save(cases, tmp_path / "cases.pt")
    outputs = []
    for name, capability in (("vector", None), ("portable", "default")):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability is not None:
            env["ATEN_CPU_CAPABILITY"] = capability
        subprocess.run([sys.executable, "-c", _VECTOR_LOOPS_CHILD, str(tmp_path / "cases.pt"), str(tmp_path / name)],
                       env=env, check=True)
        outputs.append(torch.load(tmp_path / name))
    return outputs


def test_bfloat16_vector_loops_match_the_portable_ones(tmp_path):
    """The bfloat16 gathers and gradient writes take AVX-512 forms where the CPU has AVX512-BF16
    and ATen uses AVX-512; ATEN_CPU_CAPABILITY=default turns them back to the portable loops. Both
    give bitwise the same statistics and gradients, in every plan and in the pair kernels. (On a
    CPU without AVX512-BF16 both runs take the portable loops.)"""
    torch.manual_seed(0)
    cases = []
    for size in PLANS.values():
        x3 = make_x3(*size, torch.bfloat16, mean=50.0)
        for delta in (None, 0.05):
            cases.append(("layer", (x3, torch.randn(x3.shape).to(torch.bfloat16)), (0.5, 0.2, 1e-4, 2.0, delta)))
    for size in PAIR_PLANS.values():
        za3, zb3 = make_pair3(*size, torch.bfloat16, mean=50.0)
        cases.append(("pair", (za3, zb3, pair_operands(za3, zb3, mu_dtype=torch.float32)), ()))
    for case, vector, portable in zip(cases, *_run_vector_and_portable(cases, tmp_path)):
        for a, b in zip(vector, portable):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                                                      b.view(torch.int16) if b.dtype == torch.bfloat16 else b), case[0]


def test_float32_avx512_kernels_match_the_blas(tmp_path):
    """Where the CPU has AVX-512 and ATen uses it, float32 with d <= 192 takes two kernels of ours:
    in the "bdl" layout the apply as one pass (products, shift and grad_y together), and the Gram
    products as AVX-512 dot products (bdl panels and groups, rows-layout dual plans); under
    ATEN_CPU_CAPABILITY=default the BLAS does both. The column sums agree bitwise, M2 and the terms
    to float32 rounding, the gradients to 1e-5 of the regulariser's: in the grouped plan (x shifted
    as it is read), the panel plan (the centred panel, Gram passes over parts of it), the dual plan,
    the apply kernel alone, with odd d and short slabs; past d = 192 only G's pass differs (its AVX-512
    form, bitwise the portable one's). (On a CPU without AVX-512 both runs take the portable code.)"""
    torch.manual_seed(0)
    cases = []
    for size in ((8, 96, 1300), (3, 100, 2800), (5, 96, 613), (16, 130, 49), (4, 150, 1000), (2, 7, 40), (4, 192, 17),
                 (150, 190, 1), (3, 257, 37)):
        x3 = make_x3(*size, torch.float32, mean=50.0)
        for delta in (None, 0.05):
            params = Params(0.5, 0.2, 1e-4, 2.0, delta)
            reg, _ = vcreg_backward_reference(torch.zeros_like(x3, dtype=torch.float64), x3.double(), params)
            # grad_y of the regulariser's size, or the gradients' float32 rounding would hide it
            gy3 = (torch.randn(x3.shape, dtype=torch.float64) * reg.std()).float()
            cases.append(("layer", (x3, gy3), params.values()))
        d = size[1]
        G = torch.randn(d, d) / d
        cases.append(("apply", (torch.randn(x3.shape), x3, G, x3.double().mean((0, 2)) + 0.3), ()))
    for case, vector, portable in zip(cases, *_run_vector_and_portable(cases, tmp_path)):
        if case[0] == "layer":
            x3, gy3 = case[1]
            (mu, M2, got, terms), (mu_b, M2_b, want, terms_b) = vector, portable
            assert torch.equal(mu, mu_b), tuple(x3.shape)
            assert (M2 - M2_b).norm() <= 1e-6 * M2_b.norm(), tuple(x3.shape)
            assert torch.allclose(terms, terms_b, rtol=1e-5, atol=0), (tuple(x3.shape), case[2])
        else:
            gy3 = case[1][0]
            got, want = vector[0], portable[0]
        reg = (want.double() - gy3.double()).norm()
        assert got.dtype == want.dtype == torch.float32 and got.shape == gy3.shape
        assert (got.double() - want.double()).norm() <= 1e-5 * reg, (case[0], tuple(gy3.shape))


@pytest.mark.parametrize("size", [(300, 7, 1), (3, 7, 37), (20000, 100, 1)], ids=split_id)
def test_pair_kernels_nonfinite_propagate(size):
    """A NaN in z_a reaches mu_a, its row and column of M2_a, the invariance sum, the whole row of
    grad_a (through G_a) and its own element of grad_b, as the reference's."""
    za3, zb3 = make_pair3(*size, torch.float32)
    ops = pair_operands(za3, zb3, mu_dtype=torch.float32)
    za3[1, 2, 0] = float("nan")
    got = torch.ops.vcreg.pair_stats_kernel(za3, zb3)
    want = vicreg_pair_stats_reference(za3.double(), zb3.double())
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan())
    assert got[4].isnan() and got[1].isnan().any() and not got[3].isnan().any()
    args = (ops[0], za3, zb3, *ops[1:])
    for g, w in zip(torch.ops.vcreg.pair_apply_kernel(*args), vicreg_pair_apply_reference(*args)):
        assert torch.equal(g.isnan(), w.isnan()) and g.isnan().any()


def test_pair_kernels_bad_arguments():
    """What the pair kernels assert of their operands (the messages of reference._check_pair and
    csrc/vcreg_common.h)."""
    stats, apply = torch.ops.vcreg.pair_stats_kernel, torch.ops.vcreg.pair_apply_kernel
    z = torch.randn(4, 3, 5)
    G, mu, s = torch.randn(3, 3), torch.randn(3), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="the branches differ"):
        stats(z, torch.randn(4, 3, 6))
    with pytest.raises(RuntimeError, match="the branches differ"):
        stats(z, z.double())
    with pytest.raises(RuntimeError, match="z_b must be a contiguous canonical"):
        stats(z, z.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(RuntimeError, match="floating point"):
        stats(z.int(), z.int())
    with pytest.raises(ValueError, match="no samples"):
        stats(torch.randn(0, 3, 1), torch.randn(0, 3, 1))
    with pytest.raises(RuntimeError, match="the branches differ"):
        apply(s, z, torch.randn(4, 3, 6), G, mu, G, mu, s)
    with pytest.raises(RuntimeError, match="G must be"):
        apply(s, z, z, torch.randn(3, 4), mu, G, mu, s)
    with pytest.raises(RuntimeError, match="mu must be"):
        apply(s, z, z, G, mu, G, torch.randn(4), s)
    with pytest.raises(RuntimeError, match="c must be a one-element floating point tensor"):
        apply(s, z, z, G, mu, G, mu, torch.ones(2))
    with pytest.raises(RuntimeError, match="g must be a one-element floating point tensor"):
        apply(torch.tensor(1), z, z, G, mu, G, mu, s)
    empty = torch.randn(0, 3, 1)  # no samples: no gradient to write
    assert all(g.shape == empty.shape for g in apply(s, empty, empty, G, mu, G, mu, s))


@pytest.mark.parametrize("size", [(4, 9, 33), (300, 7, 1), (20000, 100, 1)], ids=split_id)
def test_pair_outputs_do_not_share_scratch(size):
    # The pair kernels gather into per-thread scratch kept between calls; nothing they return may live in it.
    za3, zb3 = make_pair3(*size, torch.float32)
    ops = pair_operands(za3, zb3, mu_dtype=torch.float32)
    out = (*torch.ops.vcreg.pair_stats_kernel(za3, zb3), *torch.ops.vcreg.pair_apply_kernel(ops[0], za3, zb3, *ops[1:]))
    kept = [t.clone() for t in out]
    xa3, xb3 = make_pair3(*size, torch.float32, mean=3.0)
    torch.ops.vcreg.pair_stats_kernel(xa3, xb3)
    torch.ops.vcreg.pair_apply_kernel(ops[0], xa3, xb3, *ops[1:])
    for t, k in zip(out, kept):
        assert torch.equal(t, k)
