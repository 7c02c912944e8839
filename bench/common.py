"""What the latency report (SPEC section 7) measures, shared by bench/report.py and bench/test_*.py.

* Sizes: the paper's Table 8 shapes at batch 128 (``full``, for a GPU), the same shapes at
  batch 4 (``quick``, the CPU default) and two tiny shapes (``smoke``, for CI).
* Layer-level cases: one forward+backward, ``y = layer(x); y.backward(grad)`` with a fixed random
  ``grad``, of identity, naive autograd (``(x * grad).sum() + vcreg_loss(x)``), the paper's
  Algorithm 1, naive under torch.compile, BatchNorm2d / LayerNorm, and each backend of ours.
* Measurement: median, p20 and p80 over explicit warm-up and rounds, the cases of one group
  interleaved round by round (CUDA events on a GPU, perf_counter on a CPU), the device's copy
  bandwidth, and the peak memory of one step.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

import vcreg_kernels
from vcreg_kernels import dispatch

from .algorithm1 import paper_vcreg

# The product's defaults (SPEC section 3), used by every regularising implementation here.
ALPHA, BETA, EPS = 0.16, 0.01, 1e-4


@dataclass(frozen=True)
class LayerShape:
    name: str
    shape: tuple[int, ...]
    dim: int

    def with_batch(self, batch: int) -> "LayerShape":
        return replace(self, shape=(batch,) + self.shape[1:])

    @property
    def label(self) -> str:
        return f"{self.name} {tuple(self.shape)} dim={self.dim}"


# SPEC section 7: the activations after each stage of the paper's networks, batch 128.
PAPER_SHAPES = (
    LayerShape("ViT-B/32 tokens", (128, 50, 768), -1),
    LayerShape("ConvNeXt-T s1", (128, 96, 56, 56), 1),
    LayerShape("ConvNeXt-T s2", (128, 192, 28, 28), 1),
    LayerShape("ConvNeXt-T s3", (128, 384, 14, 14), 1),
    LayerShape("ConvNeXt-T s4", (128, 768, 7, 7), 1),
    LayerShape("ResNet-50 s1", (128, 256, 56, 56), 1),
    LayerShape("ResNet-50 s2", (128, 512, 28, 28), 1),
    LayerShape("ResNet-50 s3", (128, 1024, 14, 14), 1),
    LayerShape("ResNet-50 s4", (128, 2048, 7, 7), 1),
)
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Variant:
    """A dtype, and for float32 on a GPU the torch matmul precision it runs at (SPEC section 7:
    torch's default and "high"); None: whatever is set (the default)."""

    dtype: torch.dtype
    matmul_precision: Optional[str] = None

    @property
    def label(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return name if self.matmul_precision is None else f"{name}, matmul precision \"{self.matmul_precision}\""

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """torch.set_float32_matmul_precision(matmul_precision) for the duration."""
        if self.matmul_precision is None:
            yield
            return
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.matmul_precision)
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)


def variants(dtypes: tuple[torch.dtype, ...], device: torch.device) -> list[Variant]:
    """The layer level's dtypes; on a GPU float32 twice: at torch's default precision ("highest")
    and at "high" (TF32), which users switch on with torch.set_float32_matmul_precision."""
    out = []
    for dtype in dtypes:
        if dtype == torch.float32 and device.type == "cuda":
            out += [Variant(dtype, "highest"), Variant(dtype, "high")]
        else:
            out.append(Variant(dtype))
    return out


@dataclass(frozen=True)
class Size:
    """How big and how long: one of ``SIZES``."""

    name: str
    note: str
    layer_shapes: tuple[LayerShape, ...]
    dtypes: tuple[torch.dtype, ...]
    warmup: int  # untimed calls before the rounds, at least ...
    warmup_s: float  # ... and until this many seconds have passed in them (at most 100 calls)
    min_rounds: int
    max_rounds: int
    row_budget_s: float  # rounds = clamp(ceil(row_budget_s / one probe call), min_rounds, max_rounds)
    compile_backend: str  # torch.compile backend of the "naive + compile" rows
    compile_dtypes: tuple[torch.dtype, ...]  # dtypes that get a "naive + torch.compile" row
    compile_shapes: Optional[tuple[str, ...]]  # names of the shapes that get one (None: all)
    net_batch: int
    net_image: int
    net_tiny: bool  # narrow variants of the networks (same torchvision classes and blocks), for smoke
    net_warmup: int
    net_rounds: int
    threads: Optional[int] = None  # torch.set_num_threads for the run (None: torch's default)


SIZES = {
    "full": Size(
        "full", "the paper's sizes: layer shapes at batch 128, networks at batch 128 on 224x224 images",
        PAPER_SHAPES, DTYPES, warmup=5, warmup_s=0.0, min_rounds=10, max_rounds=100, row_budget_s=0.25,
        compile_backend="inductor", compile_dtypes=DTYPES, compile_shapes=None,
        net_batch=128, net_image=224, net_tiny=False, net_warmup=2, net_rounds=8,
    ),
    "quick": Size(
        "quick", "reduced sizes: layer shapes at batch 4 instead of 128; networks at batch 4 on 64x64 "
        "images (vit_b_32(image_size=64): 4 patches + class token); naive + torch.compile only in float32 "
        "at the first shape of each network",
        tuple(s.with_batch(4) for s in PAPER_SHAPES), DTYPES, warmup=1, warmup_s=0.25, min_rounds=3, max_rounds=20,
        row_budget_s=0.15, compile_backend="inductor", compile_dtypes=(torch.float32,),
        compile_shapes=("ViT-B/32 tokens", "ConvNeXt-T s1", "ResNet-50 s1"),
        net_batch=4, net_image=64, net_tiny=False, net_warmup=1, net_rounds=5,
    ),
    "smoke": Size(
        "smoke", "smoke test (CI): two tiny layer shapes; narrow variants of the three networks (same "
        "torchvision classes and blocks) at batch 2 on 32x32 images; one round; torch.compile with the "
        "aot_eager backend; one CPU thread; the numbers mean nothing",
        (LayerShape("tokens", (2, 10, 48), -1), LayerShape("NCHW", (2, 16, 8, 8), 1)),
        DTYPES, warmup=0, warmup_s=0.0, min_rounds=1, max_rounds=1, row_budget_s=0.0,
        compile_backend="aot_eager", compile_dtypes=DTYPES, compile_shapes=None,
        net_batch=2, net_image=32, net_tiny=True, net_warmup=0, net_rounds=1,
        threads=1,  # nothing to measure; one thread keeps a busy machine from stretching it
    ),
}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_size_name(device: torch.device) -> str:
    return "full" if device.type == "cuda" else "quick"


# ---------------------------------------------------------------------------------------------
# Which backends of ours are benchmarked, and forcing one.


def benchmarked_backends(device: torch.device) -> list[str]:
    """Our backends that run on ``device`` here (``dispatch.available_backends``).

    Triton on CPU tensors is Triton's interpreter (TRITON_INTERPRET=1, for tests): not timed.
    """
    return [b for b in dispatch.available_backends(device.type) if not (b == "triton" and device.type == "cpu")]


def auto_backend(device: torch.device) -> str:
    """The backend ``auto`` picks for a tensor on ``device`` (what a user gets by default)."""
    with warnings_suppressed():
        return dispatch.resolve_backend(torch.empty(0, device=device), "auto")


@contextlib.contextmanager
def forced_backend(name: Optional[str]) -> Iterator[None]:
    """``vcreg_kernels.set_backend(name)`` for the duration, then the previous choice again."""
    if name is None:
        yield
        return
    previous = dispatch.get_backend()
    vcreg_kernels.set_backend(name)
    try:
        yield
    finally:
        vcreg_kernels.set_backend(previous)


@contextlib.contextmanager
def warnings_suppressed() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------------------------
# Layer-level cases.


@dataclass
class Case:
    """One implementation, ready to time: ``run()`` is one forward+backward (grads cleared first);
    ``clear()`` drops the grads it produced, so a memory measurement starts from the inputs alone."""

    key: str  # stable identifier: identity, naive, naive_compile, paper_alg1, norm, ours_<backend>
    label: str
    run: Callable[[], None]
    clear: Callable[[], None]
    compile_s: Optional[float] = None  # naive_compile: the first call's time, compilation included


def ours_key(backend: str) -> str:
    return f"ours_{backend}"


def layer_impl_keys(size: Size, shape: LayerShape, dtype: torch.dtype, device: torch.device) -> list[str]:
    """The implementations compared at one shape and dtype, identity first."""
    keys = ["identity", "norm", "naive"]
    if dtype in size.compile_dtypes and (size.compile_shapes is None or shape.name in size.compile_shapes):
        keys.append("naive_compile")
    keys.append("paper_alg1")
    keys += [ours_key(b) for b in benchmarked_backends(device)]
    return keys


def norm_label(shape: LayerShape) -> str:
    return "LayerNorm" if len(shape.shape) != 4 else "BatchNorm2d"


def impl_label(key: str, shape: Optional[LayerShape] = None) -> str:
    if key == "norm":
        return norm_label(shape) if shape is not None else "BN / LN"
    if key.startswith("ours_"):
        return f"ours: {key[5:]}"
    return {
        "identity": "identity",
        "naive": "naive (autograd)",
        "naive_compile": "naive + torch.compile",
        "paper_alg1": "paper Alg. 1 (eager)",
    }[key]


def make_inputs(shape: LayerShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """x (a leaf that requires grad) and the fixed random grad_y, drawn fresh from ``seed``."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape.shape, generator=g, device=device).to(dtype).requires_grad_()
    grad = torch.randn(shape.shape, generator=g, device=device).to(dtype)
    return x, grad


def _naive_objective(x: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    # Backpropagating (x * grad).sum() feeds ``grad`` into the layer's output as y.backward(grad) does.
    return (x * grad).sum() + vcreg_kernels.vcreg_loss(x, ALPHA, BETA, EPS, dim=dim)


def make_layer_case(key: str, shape: LayerShape, x: torch.Tensor, grad: torch.Tensor, size: Size) -> Case:
    """The forward+backward of implementation ``key`` on ``x`` (see the module docstring)."""
    dim = shape.dim
    modules: list[nn.Module] = []

    def clear() -> None:
        x.grad = None
        for m in modules:
            m.zero_grad(set_to_none=True)

    if key == "identity":
        def step() -> None:
            x.view_as(x).backward(grad)
    elif key == "naive":
        def step() -> None:
            _naive_objective(x, grad, dim).backward()
    elif key == "naive_compile":
        torch._dynamo.reset()  # a fresh compilation per shape and dtype, no recompile limit reached
        compiled = torch.compile(_naive_objective, backend=size.compile_backend, dynamic=False)

        def step() -> None:
            compiled(x, grad, dim).backward()
    elif key == "paper_alg1":
        def step() -> None:
            paper_vcreg(x, ALPHA, BETA, EPS, dim).backward(grad)
    elif key == "norm":
        d = x.shape[dim]
        norm = nn.BatchNorm2d(d) if len(shape.shape) == 4 else nn.LayerNorm(d)
        norm = norm.to(device=x.device, dtype=x.dtype).train()
        modules.append(norm)

        def step() -> None:
            norm(x).backward(grad)
    elif key.startswith("ours_"):
        backend = key[len("ours_"):]

        def step() -> None:
            with forced_backend(backend):
                vcreg_kernels.vcreg(x, ALPHA, BETA, EPS, dim=dim).backward(grad)
    else:
        raise ValueError(f"unknown implementation {key!r}")

    def run() -> None:
        clear()
        step()

    compile_s = None
    if key == "naive_compile":  # compile now, and say how long it took
        t0 = time.perf_counter()
        run()
        synchronize(x.device)
        compile_s = time.perf_counter() - t0
    return Case(key, impl_label(key, shape), run, clear, compile_s)


def moved_bytes(shape: LayerShape, dtype: torch.dtype) -> int:
    """Bytes a fused forward+backward must move: x read twice (stats, then apply), grad_y read
    once, grad_x written once."""
    return 4 * math.prod(shape.shape) * torch.finfo(dtype).bits // 8


# ---------------------------------------------------------------------------------------------
# Measurement.


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, linearly interpolated (p20: q = 0.2)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spread(times: list[float]) -> dict[str, float]:
    """median_s, p20_s and p80_s of ``times``."""
    return dict(median_s=statistics.median(times), p20_s=quantile(times, 0.2), p80_s=quantile(times, 0.8))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer_name(device: torch.device) -> str:
    return "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter"


# Rounds enqueued behind one GPU sleep: the host queues them while the GPU sleeps, so the events
# time the device's work and not the host's Python and launch overhead (which a training step
# hides by running ahead of the GPU).
_GPU_GROUP = 10
_GPU_SLEEP_CYCLES = 30_000_000  # about 15 ms at 2 GHz: the host queues 10 rounds well within it


def time_rounds(fn: Callable[[], None], device: torch.device, rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` calls of ``fn``.

    On a GPU each call sits between two CUDA events on the current stream and the times are
    read after one synchronize at the end, so they are device times with no host sync between
    rounds; every ``_GPU_GROUP`` rounds are queued behind a ``torch.cuda._sleep`` so that the
    GPU never waits for the host between them. On a CPU each call is timed with perf_counter.
    """
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
        torch.cuda.synchronize(device)
        for i, (start, end) in enumerate(zip(starts, ends)):
            if i % _GPU_GROUP == 0:
                torch.cuda._sleep(_GPU_SLEEP_CYCLES)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def rounds_for(estimate_s: Optional[float], min_rounds: int, max_rounds: int, budget_s: float) -> int:
    """``clamp(ceil(budget_s / estimate_s), min_rounds, max_rounds)``; min_rounds without an estimate."""
    if estimate_s is None:
        return min_rounds
    return max(min_rounds, min(max_rounds, math.ceil(budget_s / max(estimate_s, 1e-9))))


def warm_up(fn: Callable[[], None], device: torch.device, calls: int, seconds: float = 0.0) -> Optional[float]:
    """``calls`` warm-up calls, and more until ``seconds`` have passed in them (at most 100);
    returns the last one's time (to size the rounds), or None without any.

    A warm-up by time as well as by count, so that the rounds start after whatever the previous
    case left behind on a small CPU (caches, allocator, sleeping OpenMP workers).
    """
    warm = time_rounds(fn, device, calls) if calls else []
    while seconds and sum(warm) < seconds and len(warm) < 100:
        warm += time_rounds(fn, device, 1)
    return warm[-1] if warm else None


def measure_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, min_rounds: int,
                        max_rounds: int, budget_s: float, warmup_s: float = 0.0,
                        ) -> dict[str, Union[list[float], BaseException]]:
    """Per-round times of each case of one group, its rounds interleaved with the others'.

    Each case is warmed up (``warm_up``) and gets ``rounds_for(its last warm-up call)`` rounds;
    then the cases take turns, one round each on a CPU (a block of up to ``_GPU_GROUP`` rounds
    behind one sleep on a GPU), until each has its rounds: a slow or busy moment of a shared
    machine falls on every case alike, so ratios within the group are taken in the same
    conditions. A case that raises keeps its exception in place of its times and leaves the turns.
    """
    out: dict[str, Union[list[float], BaseException]] = {}
    left: dict[str, int] = {}
    for key, fn in fns.items():
        try:
            left[key] = rounds_for(warm_up(fn, device, warmup, warmup_s), min_rounds, max_rounds, budget_s)
            out[key] = []
        except Exception as e:  # noqa: BLE001
            out[key] = e
    block = _GPU_GROUP if device.type == "cuda" else 1
    while left:
        for key in list(left):
            try:
                out[key] += time_rounds(fns[key], device, min(block, left[key]))
                left[key] -= min(block, left[key])
            except Exception as e:  # noqa: BLE001
                out[key] = e
                left[key] = 0
            if left[key] == 0:
                del left[key]
    return out


def pedantic(benchmark, case: Case, device: torch.device, size: Size) -> Optional[float]:
    """Time ``case.run`` under pytest-benchmark with explicit warm-up and rounds (``rounds_for``
    on the last warm-up call); on a GPU each timed call ends with a synchronize, so the host timer
    sees the device's work. Returns the median, or None under --benchmark-disable."""
    def run() -> None:
        case.run()
        synchronize(device)

    estimate = warm_up(run, device, size.warmup, size.warmup_s)
    rounds = rounds_for(estimate, size.min_rounds, size.max_rounds, size.row_budget_s)
    benchmark.extra_info.update(warmup=size.warmup, size=size.name)
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats else None


def regularizer_grad(case: Case, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """x.grad of one ``case.run()`` with grad_y = 0 (the case's own ``grad`` zeroed in place for
    the call, then restored): the regulariser's gradient alone, to check what was timed."""
    saved = grad.clone()
    grad.zero_()
    try:
        case.run()
        return x.grad.detach().float().clone()
    finally:
        grad.copy_(saved)


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    # Kineto writes a few lines to the C-level stderr at every profiler start and stop.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(case: Case, device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one ``case.run()`` above what was allocated before it.

    GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the
    allocation and free records of torch's CPU allocator that ``torch.profiler`` keeps with
    ``profile_memory=True``, summed in time order, maximum of the running sum (tracemalloc does
    not see torch's allocator). Inputs allocated before the call are excluded either way.
    None on other devices. The case has run once when this returns.
    """
    case.clear()
    if device.type not in ("cuda", "cpu"):
        case.run()
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        case.run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _stderr_to_devnull(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.run()
    records = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, rounds: int = 10) -> float:
    """The device's copy bandwidth in bytes/s: a large ``dst.copy_(src)``, counting the bytes read
    and written (2 * size), median of ``rounds`` after a warm-up copy. 1 GiB buffers on a GPU,
    256 MiB on a CPU (well beyond its caches)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = statistics.median(time_rounds(lambda: dst.copy_(src), device, rounds))
    return 2 * src.numel() * src.element_size() / seconds


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Where the numbers come from.


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """A folder name for bench/results/: ``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2c``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {device_name(device).split(' (')[0]} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"torch": torch.__version__, "vcreg_kernels": vcreg_kernels.__version__,
                                     "python": platform.python_version()}
    for mod in ("triton", "torchvision"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    out["cuda"] = torch.version.cuda
    out["hip"] = torch.version.hip
    return out
