"""Layer level of SPEC section 7 under pytest-benchmark: one layer's forward+backward per shape,
dtype (and on a GPU float32 matmul precision) and implementation (bench/common.py), one benchmark
group per shape and variant. Each test also checks that what it timed regularises: the gradient
of naive + torch.compile and of each backend of ours matches naive autograd's, and the paper's
Algorithm 1 adds a non-zero one."""
import torch

from bench import common

# Relative error (norm of the difference over the norm of naive's regulariser gradient) that
# the timed implementations must stay under: SPEC section 6's bounds where TF32 may be on (the
# Triton kernels' float32 tl.dot on NVIDIA) and for bf16. The tests in tests/ hold the exact ones.
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


def test_layer(benchmark, layer_case, bench_size, device):
    shape, variant, key = layer_case
    with variant.active():
        _check_layer(benchmark, shape, variant, key, bench_size, device)


def _check_layer(benchmark, shape, variant, key, bench_size, device):
    dtype = variant.dtype
    x, grad = common.make_inputs(shape, dtype, device)
    case = common.make_layer_case(key, shape, x, grad, bench_size)
    benchmark.group = f"layer {variant.label} {shape.label}"
    nbytes = common.moved_bytes(shape, dtype)
    benchmark.extra_info.update(shape=list(shape.shape), dim=shape.dim, dtype=str(dtype)[6:],
                                matmul_precision=variant.matmul_precision, impl=key,
                                label=case.label, bytes=nbytes)

    t = common.pedantic(benchmark, case, device, bench_size)

    if t:
        benchmark.extra_info["gbps"] = nbytes / t / 1e9
    identity = common.make_layer_case("identity", shape, x, grad, bench_size)
    peak0 = common.peak_bytes(identity, device)
    peak = common.peak_bytes(case, device)  # runs the case once more: x.grad is its gradient
    benchmark.extra_info["peak_extra_bytes"] = None if peak is None or peak0 is None else peak - peak0

    assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all()
    if key == "naive_compile" or key.startswith("ours_"):
        naive = common.make_layer_case("naive", shape, x, grad, bench_size)
        want = common.regularizer_grad(naive, x, grad)
        got = common.regularizer_grad(case, x, grad)
        assert ((got - want).norm() / want.norm()).item() < TOLERANCE[dtype]
    elif key == "paper_alg1":
        assert common.regularizer_grad(case, x, grad).norm() > 0
