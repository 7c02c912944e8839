"""pytest-benchmark set-up of bench/ (SPEC section 7). ``tests/`` never collects this folder.

Size of the run (bench/common.py ``SIZES``), first that applies:
  --bench-size {smoke,quick,full}
  VCREG_BENCH_SIZE={smoke,quick,full}
  VCREG_BENCH_SMOKE=1 or CI=true          -> smoke: tiny shapes, one round, well under a minute
  otherwise                               -> full on a GPU, quick on a CPU

    VCREG_BENCH_SMOKE=1 pytest bench/                                  # CI
    pytest bench/ --bench-size quick --benchmark-json=bench.json       # numbers, on a CPU
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything imports triton: bench/triton_tune.py's smoke runs the kernels in the
    # interpreter (the report itself never times triton on a CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import common  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-size", choices=sorted(common.SIZES), default=None,
                     help="bench/ sizes: smoke (CI), quick (CPU default), full (GPU default)")


def _size_name(config) -> str:
    name = config.getoption("--bench-size") or os.environ.get("VCREG_BENCH_SIZE")
    if name:
        return name
    if os.environ.get("VCREG_BENCH_SMOKE", "0") == "1" or os.environ.get("CI", "").lower() == "true":
        return "smoke"
    return common.default_size_name(common.default_device())


def pytest_report_header(config):
    size = common.SIZES[_size_name(config)]
    device = common.default_device()
    return [f"vcreg bench: {size.name} sizes ({size.note}); device {common.device_name(device)}; "
            f"our backends: {common.benchmarked_backends(device)}"]


def pytest_generate_tests(metafunc):
    size = common.SIZES[_size_name(metafunc.config)]
    device = common.default_device()
    if "layer_case" in metafunc.fixturenames:
        params = [(shape, v, key) for shape in size.layer_shapes for v in common.variants(size.dtypes, device)
                  for key in common.layer_impl_keys(size, shape, v.dtype, device)]
        metafunc.parametrize("layer_case", params, ids=[
            f"{s.name.replace(' ', '_')}-{str(v.dtype)[6:]}{'-' + v.matmul_precision if v.matmul_precision else ''}-{k}"
            for s, v, k in params])
    if "network_case" in metafunc.fixturenames:
        from bench.networks import NETWORKS, network_impl_keys

        params = [(spec, key) for spec in NETWORKS for key in network_impl_keys(device)]
        metafunc.parametrize("network_case", params, ids=[f"{s.name}-{k}" for s, k in params])


@pytest.fixture(scope="session")
def bench_size(request) -> common.Size:
    return common.SIZES[_size_name(request.config)]


@pytest.fixture(scope="session", autouse=True)
def _bench_threads(bench_size):
    """The size's torch thread count while bench/ runs (smoke: one), torch's own again after."""
    previous = torch.get_num_threads()
    if bench_size.threads:
        torch.set_num_threads(bench_size.threads)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def device():
    return common.default_device()
