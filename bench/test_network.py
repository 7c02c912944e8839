"""Network level of SPEC section 7 (the paper's Table 8) under pytest-benchmark: a torchvision
ViT-B/32, ConvNeXt-T and ResNet-50 with a layer after every block (bench/networks.py), one
forward+backward step per implementation, one benchmark group per network."""
import dataclasses

import pytest
import torch

from bench import common

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def network_bench(bench_size, device):
    """One NetworkBench per network, built once for all of its implementations."""
    from bench.networks import NetworkBench

    built = {}

    def get(spec):
        if spec.name not in built:
            built.clear()  # one network in memory at a time
            built[spec.name] = NetworkBench(spec, bench_size.net_batch, bench_size.net_image, device,
                                            bench_size.net_tiny)
        return built[spec.name]

    yield get
    built.clear()


def test_network(benchmark, network_case, network_bench, bench_size, device):
    spec, key = network_case
    net = network_bench(spec)
    case = net.case(key, net.norm_label() if key == "norm" else common.impl_label(key))
    benchmark.group = f"network {spec.name} batch {net.batch} {net.image}px"
    benchmark.extra_info.update(network=spec.name, impl=key, label=case.label, n_inserted=net.n_inserted,
                                batch=net.batch, image=net.image)
    network_size = dataclasses.replace(bench_size, warmup=bench_size.net_warmup, min_rounds=bench_size.net_rounds,
                                  max_rounds=bench_size.net_rounds)

    common.pedantic(benchmark, case, device, network_size)

    benchmark.extra_info["peak_bytes"] = common.peak_bytes(case, device)  # runs the case once more
    grads = [p.grad for p in net.model.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
