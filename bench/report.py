"""The latency report, the product's main job (SPEC section 7): what VCReg costs on this device.

    python -m bench.report            # full sizes on a GPU, --quick (reduced sizes) on a CPU
    python -m bench.report --quick    # a few minutes on a 2-core CPU
    python -m bench.report --smoke    # seconds; checks that the report runs

Runs on the device present (CUDA/ROCm GPU, else CPU) and writes, under out/report/<device-name>/
(ignored by git; ``--out bench/results/<device-name>`` updates the committed results on purpose):

* report.json: pytest-benchmark's JSON layout (``machine_info``, ``commit_info``, ``benchmarks``
  with ``stats`` and ``extra_info``, ``datetime``, ``version``), so ``pytest-benchmark compare``
  reads it, plus a ``vcreg`` object with the run's metadata, the paper's Table 8, the CPU
  section and every error row. Each benchmark's ``extra_info`` holds the derived columns below.
* report.md: the Markdown tables printed at the end.
* report.png: median time per implementation per shape (and per network), log scale.

Layer level: one layer's forward+backward on one activation (bench/common.py), at the paper's
Table 8 shapes (batch 128; batch 4 in --quick), float32 (on a GPU at torch's default matmul
precision and at "high") and bfloat16. Columns: median time with p20 and p80,
ratios to identity and to BN/LN, the naive implementation's time over this one, achieved GB/s
(bytes a fused pass must move: x twice, grad_y once, grad_x once, over the median time) and its
fraction of the copy bandwidth measured in the same run, and peak memory above identity's.
Network level (bench/networks.py): ViT-B/32, ConvNeXt-T and ResNet-50 with a layer after every
block, forward+backward, beside the paper's own Table 8 as ratios to identity.
CPU section (bench/cpu_ratios.py): the cpu backend against an eager autograd.Function computing
the same gradient and against the BLAS floor, at the layer shapes at batch 4 and 16, interleaved.
Loss level (bench/loss.py): VICReg's loss, forward+backward, time and peak memory against
facebookresearch/vicreg's formula in plain autograd (SPEC section 7).

A row whose implementation fails records the error and the report goes on; the command then
exits with status 1, after writing everything.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # Before torch loads libgomp. On small VMs, OpenMP's default wait policy makes parallel ops
    # stall ~30 ms each after the main thread has been busy in Python (BatchNorm 1 ms -> 32 ms
    # on a 2-vCPU machine), which hits every implementation at random.
    # Sleeping workers remove that; OMP_WAIT_POLICY=ACTIVE (or any value) is left as given.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
from pytest_benchmark import __version__ as pytest_benchmark_version  # noqa: E402
from pytest_benchmark.plugin import pytest_benchmark_generate_machine_info  # noqa: E402
from pytest_benchmark.stats import Stats  # noqa: E402
from pytest_benchmark.utils import get_commit_info  # noqa: E402

from . import common, cpu_ratios, loss  # noqa: E402
from .common import (ALPHA, BETA, EPS, SIZES, LayerShape, Size, Variant, auto_backend,  # noqa: E402
                     benchmarked_backends, forced_backend, impl_label, layer_impl_keys, make_inputs,
                     make_layer_case, measure_interleaved, moved_bytes, ours_key, peak_bytes, release_memory)
from .networks import NETWORKS, NetworkBench, network_impl_keys  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Fresh output goes to this ignored folder; ``--out bench/results/<device>`` updates committed results.
OUT = ROOT / "out" / "report"

MiB = 1 << 20


class Progress:
    """One line per measurement: ``[ 12/134] 41s  layer ... : 3.2 ms``."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done:3d}/{self.total}] {time.perf_counter() - self.t0:6.0f}s  {what}", end="", flush=True)

    def result(self, text: str) -> None:
        print(f" : {text}", flush=True)


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _fmt_spread(stats: dict) -> str:
    """``median [p20, p80]`` of a row's times."""
    return (f"{_fmt_time(stats['median_s'])} [{_fmt_time(stats['p20_s'])}, "
            f"{_fmt_time(stats['p80_s'])}]")


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def _record_error(row: dict, e: BaseException) -> None:
    row["error"] = _error_text(e)
    if os.environ.get("VCREG_BENCH_TRACEBACK"):
        traceback.print_exception(e)


def _measure_group(factories: dict[str, Callable[[], common.Case]], device: torch.device, warmup: int,
                   warmup_s: float, min_rounds: int, max_rounds: int, budget_s: float, progress: Progress,
                   what: str) -> dict[str, dict]:
    """Time the cases of one group (one shape and dtype, or one network), their rounds interleaved
    (``common.measure_interleaved``), then measure each one's peak memory. Errors are recorded in
    the rows, never raised: one failing implementation must not stop the report."""
    rows: dict[str, dict] = {key: {"error": None} for key in factories}
    labels = dict.fromkeys(factories, "")
    cases: dict[str, common.Case] = {}
    for key, factory in factories.items():
        try:
            cases[key] = factory()
            labels[key] = cases[key].label
        except Exception as e:  # noqa: BLE001
            labels[key] = key
            _record_error(rows[key], e)
    try:
        timed = measure_interleaved({k: c.run for k, c in cases.items()}, device, warmup, min_rounds, max_rounds,
                                    budget_s, warmup_s)
        for key, case in cases.items():
            row, times = rows[key], timed[key]
            if isinstance(times, BaseException):
                _record_error(row, times)
                continue
            row.update(times_s=times, **common.spread(times), rounds=len(times), warmup=warmup,
                       compile_s=case.compile_s)
            try:
                row["peak_bytes"] = peak_bytes(case, device)
            except Exception as e:  # noqa: BLE001
                _record_error(row, e)
    finally:
        for case in cases.values():
            case.clear()
        cases.clear()  # their closures hold the steps' tensors; the next group gets the memory
        release_memory(device)
    for key, row in rows.items():
        progress.step(f"{what} {labels[key]}")
        progress.result("ERROR " + row["error"] if row["error"] else _fmt_time(row["median_s"]))
    return rows


def _add_ratios(rows: list[dict], norm_key: str = "norm") -> None:
    """Ratios within one group (one shape and dtype, or one network): to identity, to BN/LN, and
    naive over this; peak memory above identity's."""
    by_key = {r["impl"]: r for r in rows if r.get("median_s")}
    ident, norm, naive = by_key.get("identity"), by_key.get(norm_key), by_key.get("naive")
    for r in rows:
        t = r.get("median_s")
        r["ratio_identity"] = t / ident["median_s"] if t and ident else None
        r["ratio_norm"] = t / norm["median_s"] if t and norm else None
        r["naive_over"] = naive["median_s"] / t if t and naive else None
        p, p0 = r.get("peak_bytes"), ident.get("peak_bytes") if ident else None
        r["peak_extra_bytes"] = p - p0 if p is not None and p0 is not None else None


# ---------------------------------------------------------------------------------------------
# The three parts of the report.


def layer_plan(size: Size, device: torch.device) -> list[tuple[LayerShape, Variant, list[str]]]:
    return [(s, v, layer_impl_keys(size, s, v.dtype, device)) for s in size.layer_shapes
            for v in common.variants(size.dtypes, device)]


def _layer_group(size: Size, shape: LayerShape, variant: Variant, keys: list[str], device: torch.device,
                 copy_bw: float, auto: str, progress: Progress) -> list[dict]:
    dtype = variant.dtype
    x, grad = make_inputs(shape, dtype, device)
    nbytes = moved_bytes(shape, dtype)
    factories = {k: (lambda k=k: make_layer_case(k, shape, x, grad, size)) for k in keys}
    with variant.active():
        measured = _measure_group(factories, device, size.warmup, size.warmup_s, size.min_rounds, size.max_rounds,
                                  size.row_budget_s, progress, f"layer {shape.label} {variant.label}")
    group = []
    for key in keys:
        row = measured[key]
        row.update(level="layer", shape_name=shape.name, shape=list(shape.shape), dim=shape.dim,
                   dtype=str(dtype)[6:], matmul_precision=variant.matmul_precision, variant=variant.label,
                   impl=key, label=impl_label(key, shape), bytes=nbytes,
                   auto=key == ours_key(auto))
        t = row.get("median_s") if key != "identity" else None  # identity moves none of those bytes
        row["gbps"] = nbytes / t / 1e9 if t else None
        row["copy_bw_fraction"] = nbytes / t / copy_bw if t else None
        group.append(row)
    _add_ratios(group)
    return group


def run_layer_level(size: Size, device: torch.device, copy_bw: float, auto: str, progress: Progress) -> list[dict]:
    rows = []
    for shape, variant, keys in layer_plan(size, device):
        rows += _layer_group(size, shape, variant, keys, device, copy_bw, auto, progress)
        release_memory(device)
    return rows


def _network_group(size: Size, spec, keys: list[str], device: torch.device, auto: str,
                   progress: Progress) -> list[dict]:
    what = f"network {spec.name} batch {size.net_batch} {size.net_image}px"
    try:
        net = NetworkBench(spec, size.net_batch, size.net_image, device, size.net_tiny)
    except Exception as e:  # noqa: BLE001
        rows = []
        for key in keys:
            progress.step(f"{what} {key}")
            progress.result("ERROR " + _error_text(e))
            rows.append(dict(level="network", network=spec.name, impl=key, label=key, error=_error_text(e)))
        return rows
    labels = {k: net.norm_label() if k == "norm" else impl_label(k) for k in keys}
    factories = {k: (lambda k=k: net.case(k, labels[k])) for k in keys}
    measured = _measure_group(factories, device, size.net_warmup, size.warmup_s, size.net_rounds, size.net_rounds,
                              0.0, progress, f"{what}, {net.n_inserted} x")
    group = []
    for key in keys:
        row = measured[key]
        row.update(level="network", network=spec.name, batch=size.net_batch, image=size.net_image,
                   n_inserted=net.n_inserted, dim=spec.dim, dtype="float32", impl=key, label=labels[key],
                   auto=key == ours_key(auto))
        group.append(row)
    _add_ratios(group)
    return group


def run_network_level(size: Size, device: torch.device, auto: str, progress: Progress) -> list[dict]:
    rows = []
    for spec in NETWORKS:
        rows += _network_group(size, spec, network_impl_keys(device), device, auto, progress)
        release_memory(device)
    return rows


def cpu_ratio_reps(size: Size) -> int:
    return max(size.min_rounds, min(30, size.max_rounds // 2))


def cpu_ratio_shapes(size: Size) -> tuple[LayerShape, ...]:
    return cpu_ratios.SMOKE_SHAPES if size.name == "smoke" else cpu_ratios.SHAPES


def run_cpu_ratios(size: Size, progress: Progress) -> list[dict]:
    """bench/cpu_ratios.py's interleaved measurement (ours, the eager autograd.Function, naive and
    the BLAS floor; forward+backward, float32) for each of our CPU backends."""
    rows = []
    for shape in cpu_ratio_shapes(size):
        for backend in benchmarked_backends(torch.device("cpu")):
            progress.step(f"cpu-ratio {shape.label} ours: {backend} vs eager vs naive vs BLAS")
            row = dict(shape_name=shape.name, shape=list(shape.shape), dim=shape.dim, dtype="float32",
                       backend=backend, error=None)
            try:
                with forced_backend(backend):
                    times = cpu_ratios.measure(shape, cpu_ratio_reps(size), warmup=min(2, size.warmup + 1))
                row.update(times_s=times, **cpu_ratios.summary(times))
                progress.result(f"ours/eager {row['ours_over_eager']:.2f}, ours/BLAS {row['ours_over_blas']:.2f}")
            except Exception as e:  # noqa: BLE001
                row["error"] = _error_text(e)
                progress.result("ERROR " + row["error"])
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Output.


def paper_comparison(network_rows: list[dict], auto: str) -> list[dict]:
    """The paper's Table 8 beside ours, as ratios to identity, for the networks it has."""
    out = []
    for spec in NETWORKS:
        if spec.paper is None:
            continue
        ours = {r["impl"]: r.get("ratio_identity") for r in network_rows if r["network"] == spec.name}
        p = spec.paper
        out.append(dict(
            network=spec.name,
            paper_s=dict(p),
            paper_ratio={k: v / p["identity"] for k, v in p.items()},
            ours_ratio={"identity": ours.get("identity"), "naive": ours.get("naive"),
                        "fast": ours.get(ours_key(auto)), "paper_alg1": ours.get("paper_alg1"),
                        "bn": ours.get("norm")},
            ours_backend=auto,
        ))
    return out


def _overhead(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{(ratio - 1) * 100:+.1f}%"


def to_markdown(report: dict) -> str:
    meta = report["meta"]
    v = meta["versions"]
    lines = [
        f"# VCReg latency report: {meta['device_name']}",
        "",
        f"- date: {meta['date']}; mode: `{meta['size']}` ({meta['size_note']})",
        f"- torch {v['torch']}, triton {v['triton']}, torchvision {v['torchvision']}, python {v['python']}, "
        f"CUDA {v['cuda']}, HIP {v['hip']}; commit {meta['commit']}",
        f"- our backends timed here: {', '.join(meta['backends']) or 'none'} (`auto` picks `{meta['auto_backend']}`, "
        f"marked *); alpha={ALPHA}, beta={BETA}, eps={EPS}, gamma=1, delta=None",
        f"- copy bandwidth measured in this run: {meta['copy_bandwidth_Bps'] / 1e9:.1f} GB/s (bytes read + written "
        f"by a large on-device copy); timer: {meta['timer']}; float32 matmul precision "
        f"\"{meta['float32_matmul_precision']}\" (TF32 matmul {meta['tf32_matmul']}), "
        f"cuDNN TF32 {meta['tf32_cudnn']}; {meta['torch_threads']} torch threads, OMP_WAIT_POLICY "
        f"{meta['omp_wait_policy'] or 'unset'}",
        f"- peak memory: {meta['memory_method']}",
        f"- report took {meta['elapsed_s']:.0f} s; 1-minute load average {meta['load_average_1min']['start']:.1f} at "
        f"the start, {meta['load_average_1min']['end']:.1f} at the end, on {meta['cpu_count']} CPUs"
        + (" (more runnable processes than CPUs: other work shared this machine, so CPU timings are noisy)"
           if max(meta["load_average_1min"].values()) > meta["cpu_count"] else ""),
        "",
    ]
    layer = report["layer"]
    if layer:
        lines += [
            "## Layer level: one layer's forward + backward",
            "",
            "`y = layer(x); y.backward(grad)` with a fixed random `grad` (naive: "
            "`((x * grad).sum() + vcreg_loss(x)).backward()`), grads set to None before each step. "
            "Identity's backward hands `grad` to `x.grad` without a copy, so it measures the autograd "
            "floor. GB/s: 4 activation-sized tensors (x twice, grad_y, grad_x) over the median time. "
            "Extra peak: memory allocated during the step above identity's (grad_x included). "
            "naive ÷: how many times faster than naive autograd. Median [p20, p80] over the rounds, the "
            "rounds of one shape and dtype interleaved case by case; the ratios are of medians. The naive + torch.compile row states its compile time (the first call's).",
            "",
        ]
        for variant in dict.fromkeys(r["variant"] for r in layer):
            lines += [f"### {variant}", "",
                      "| shape | implementation | median [p20, p80] | × identity | × BN/LN | naive ÷ | GB/s | % copy BW "
                      "| extra peak MiB |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in (r for r in layer if r["variant"] == variant):
                shape = f"{r['shape_name']} {tuple(r['shape'])}"
                name = r["label"] + (" *" if r.get("auto") else "")
                if r.get("compile_s") is not None:
                    name += f" (compile {r['compile_s']:.1f} s)"
                if r["error"]:
                    lines.append(f"| {shape} | {name} | {r['error']} | | | | | | |")
                    continue
                extra = r.get("peak_extra_bytes")
                lines.append(
                    f"| {shape} | {name} | {_fmt_spread(r)} | {_fmt(r['ratio_identity'], '.1f')} | "
                    f"{_fmt(r['ratio_norm'])} | {_fmt(r['naive_over'])} | {_fmt(r['gbps'], '.1f')} | "
                    f"{_fmt(r['copy_bw_fraction'] and 100 * r['copy_bw_fraction'], '.0f')} | "
                    f"{_fmt(extra and extra / MiB, '.1f') if extra is not None else 'n/a'} |")
            lines.append("")
    net = report["network"]
    if net:
        first = next((r for r in net if "batch" in r), {})
        lines += [
            "## Network level (the paper's Table 8 setting)",
            "",
            f"Forward + cross-entropy on random labels + backward, float32, batch {first.get('batch')}, "
            f"{first.get('image')}x{first.get('image')} images, randomly initialised torchvision models in "
            "training mode, a layer after every block (ViT-B/32: 12 EncoderBlocks, tokens, LayerNorm as BN; "
            "ConvNeXt-T: 18 CNBlocks; ResNet-50: 16 Bottlenecks). Median [p20, p80], the rounds of one "
            "network interleaved case by case.",
            "",
            "| network | inserted | implementation | median [p20, p80] | × identity | overhead | extra peak MiB |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in net:
            name = r["label"] + (" *" if r.get("auto") else "")
            if r["error"]:
                lines.append(f"| {r['network']} | | {name} | {r['error']} | | | |")
                continue
            extra = r.get("peak_extra_bytes")
            lines.append(f"| {r['network']} | {r['n_inserted']} | {name} | {_fmt_spread(r)} | "
                         f"{_fmt(r['ratio_identity'])} | {_overhead(r['ratio_identity'])} | "
                         f"{_fmt(extra and extra / MiB, '.0f') if extra is not None else 'n/a'} |")
        lines.append("")
        paper = report["paper_table8"]
        if paper:
            lines += [
                "### Beside the paper's Table 8 (ratios to identity)",
                "",
                "The paper's numbers are theirs: one NVIDIA A100, batch 128, 224x224 ImageNet images, their "
                "Algorithm 1 as \"fast\". Ours are from this run, at this run's sizes, with `fast` = our "
                f"`{paper[0]['ours_backend']}` backend (what `auto` picks here).",
                "",
                "| network | source | identity | naive | fast | BN/LN | fast overhead |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for p in paper:
                s, pr, o = p["paper_s"], p["paper_ratio"], p["ours_ratio"]
                lines.append(f"| {p['network']} | paper (A100), seconds | {s['identity']:.3f} | {s['naive']:.3f} | "
                             f"{s['fast']:.3f} | {s['bn']:.3f} | |")
                lines.append(f"| {p['network']} | paper, × identity | 1.00 | {pr['naive']:.2f} | {pr['fast']:.2f} | "
                             f"{pr['bn']:.2f} | {_overhead(pr['fast'])} |")
                lines.append(f"| {p['network']} | ours here, × identity | {_fmt(o['identity'])} | {_fmt(o['naive'])} | "
                             f"{_fmt(o['fast'])} | {_fmt(o['bn'])} | {_overhead(o['fast'])} |")
                lines.append(f"| {p['network']} | paper Alg. 1 here, × identity | | | {_fmt(o['paper_alg1'])} | | "
                             f"{_overhead(o['paper_alg1'])} |")
            lines.append("")
            lines.append("Network-level overhead of ours over identity: " + "; ".join(
                f"{p['network']} {_overhead(p['ours_ratio']['fast'])} "
                f"(paper's fast: {_overhead(p['paper_ratio']['fast'])})" for p in paper) + ".")
            lines.append("")
    ratios = report["cpu_ratios"]
    if ratios:
        lines += [
            "## CPU: ours against eager PyTorch and the BLAS floor, float32",
            "",
            f"bench/cpu_ratios.py, {meta['cpu_ratio_reps']} interleaved rounds, median [p20, p80]: ours and naive "
            "are one layer's forward+backward as in the layer table; eager is an identity autograd.Function whose "
            "backward computes the same exact gradient in plain eager ops (movedim, demean, `Xc.T @ Xc`, G, "
            "`Xc @ G`); BLAS is `torch.mm(X.T, X)` + `torch.mm(X, G)` on an (n, d) contiguous copy of X made "
            "beforehand, the two products the backward cannot avoid. The previous round's gradient is dropped "
            "outside the timed call. Targets for the cpu backend: "
            "ours/eager <= 1, ours/BLAS <= 1.3.",
            "",
            "| shape | n | backend | ours | eager | BLAS pair | naive | ours/eager | ours/BLAS | ours/naive |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in ratios:
            shape = f"{r['shape_name']} {tuple(r['shape'])}"
            n = math.prod(r["shape"]) // r["shape"][r["dim"]]
            if r["error"]:
                lines.append(f"| {shape} | {n} | {r['backend']} | {r['error']} | | | | | | |")
                continue
            lines.append(f"| {shape} | {n} | {r['backend']} | {_fmt_spread(r['ours'])} | {_fmt_spread(r['eager'])} | "
                         f"{_fmt_spread(r['blas'])} | {_fmt_time(r['naive']['median_s'])} | "
                         f"{r['ours_over_eager']:.2f} | {r['ours_over_blas']:.2f} | {r['ours_over_naive']:.2f} |")
        lines.append("")
    if report["loss"]:
        lines += loss.loss_markdown(report["loss"], meta) + [""]
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> Optional[str]:
    """Median time per implementation per shape (one panel per dtype) and per network; log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    panels = [(f"layer, {v}", [r for r in report["layer"] if r["variant"] == v], "shape_name")
              for v in dict.fromkeys(r["variant"] for r in report["layer"])]
    if report["network"]:
        panels.append(("network, float32", report["network"], "network"))
    if not panels:
        return "nothing to plot"
    all_impls = list(dict.fromkeys(r["impl"] for _, rows, _ in panels for r in rows))
    colour = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(all_impls)}
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.2 * len(panels)), squeeze=False)
    for ax, (title, rows, group_field) in zip(axes[:, 0], panels):
        groups = list(dict.fromkeys(r[group_field] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            by_group = {r[group_field]: r.get("median_s") for r in rows if r["impl"] == impl}
            label = impl_label(impl) + (" *" if any(r.get("auto") for r in rows if r["impl"] == impl) else "")
            xs = [g + i * width - 0.4 + width / 2 for g in range(len(groups))]
            ax.bar(xs, [(by_group.get(g) or float("nan")) * 1e3 for g in groups], width, label=label,
                   color=colour[impl])
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=15, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=4)
        ax.grid(axis="y", alpha=0.3)
    meta = report["meta"]
    fig.suptitle(f"VCReg forward+backward, {meta['device_name']}, {meta['size']} sizes, "
                 f"torch {meta['versions']['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def error_rows(report: dict) -> list[dict]:
    """Every row of every section whose measurement failed."""
    return [r for section in ("layer", "network", "cpu_ratios", "loss") for r in report[section] if r["error"]]


def to_benchmark_json(report: dict, commit_info: dict) -> dict:
    """pytest-benchmark's JSON layout, with the report's own fields under ``vcreg``."""
    benchmarks = []
    for r in report["layer"] + report["network"]:
        if r["error"]:
            continue
        stats = Stats()
        for t in r["times_s"]:
            stats.update(t)
        stats_dict = stats.as_dict()
        stats_dict.update(data=r["times_s"], iterations=1)
        if r["level"] == "layer":
            group = f"layer {r['variant']} {r['shape_name']} {tuple(r['shape'])}"
            precision = f"-{r['matmul_precision']}" if r["matmul_precision"] else ""
            param = f"{r['shape_name']}-{r['dtype']}{precision}-{r['impl']}"
        else:
            group = f"network {r['network']} batch {r['batch']} {r['image']}px"
            param = f"{r['network']}-{r['impl']}"
        extra = {k: v for k, v in r.items() if k not in ("times_s", "error")}
        benchmarks.append(dict(
            group=group, name=f"{r['level']}[{param}]", fullname=f"bench/report.py::{r['level']}[{param}]",
            params={"impl": r["impl"]}, param=param, extra_info=extra,
            options=dict(timer=report["meta"]["timer"], warmup=r["warmup"], rounds=r["rounds"], iterations=1),
            stats=stats_dict,
        ))
    return dict(
        machine_info=pytest_benchmark_generate_machine_info(),
        commit_info=commit_info,
        benchmarks=benchmarks,
        datetime=report["meta"]["date"],
        version=pytest_benchmark_version,
        vcreg=dict({k: v for k, v in report.items() if k not in ("layer", "network")}, errors=error_rows(report)),
    )


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="size", action="store_const", const="full",
                      help="the paper's sizes (batch 128); the default on a GPU")
    mode.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="reduced sizes (batch 4, 64x64 images); the default on a CPU")
    mode.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                      help="tiny sizes, one round: checks that the report runs")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else cpu")
    p.add_argument("--no-layer", action="store_true", help="skip the layer level")
    p.add_argument("--no-network", action="store_true", help="skip the network level")
    p.add_argument("--no-compile", action="store_true", help="skip the naive + torch.compile rows")
    p.add_argument("--no-loss", action="store_true", help="skip the loss level (VICReg's loss)")
    p.add_argument("--no-cpu-ratios", action="store_true", help="skip the CPU section (cpu backend vs eager vs BLAS)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's)")
    p.add_argument("--out", type=Path, help="output folder (default: out/report/<device-name>, ignored by git; "
                   "bench/results/<device-name> updates the committed results)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own deprecation notes, mid-table
    device = torch.device(args.device) if args.device else common.default_device()
    size = SIZES[args.size or common.default_size_name(device)]
    threads = args.threads or size.threads
    if threads:
        torch.set_num_threads(threads)
    if args.no_compile:
        size = dataclasses.replace(size, compile_dtypes=())
    out_dir = args.out or OUT / common.device_slug(device)
    backends = benchmarked_backends(device)
    auto = auto_backend(device)

    print(f"vcreg latency report on {common.device_name(device)}: {size.name} sizes ({size.note})", flush=True)
    print(f"our backends here: {backends} (auto: {auto}); results go to {out_dir}", flush=True)
    copy_bw = common.copy_bandwidth(device)
    release_memory(device)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s", flush=True)

    n_layer = 0 if args.no_layer else sum(len(k) for *_, k in layer_plan(size, device))
    n_net = 0 if args.no_network else len(NETWORKS) * len(network_impl_keys(device))
    n_cpu = 0 if args.no_cpu_ratios else len(cpu_ratio_shapes(size)) * len(benchmarked_backends(torch.device("cpu")))
    progress = Progress(n_layer + n_net + n_cpu)

    layer_rows = [] if args.no_layer else run_layer_level(size, device, copy_bw, auto, progress)
    network_rows = [] if args.no_network else run_network_level(size, device, auto, progress)
    cpu_rows = [] if args.no_cpu_ratios else run_cpu_ratios(size, progress)
    if args.no_loss:
        loss_rows = []
    else:
        print(f"loss level ({loss.SIZES[size.name].note}):", flush=True)
        loss_rows = loss.run_loss_level(size.name, device)

    commit_info = get_commit_info("vcreg_kernels")
    meta = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=str(device), device_name=common.device_name(device), device_slug=common.device_slug(device),
        size=size.name, size_note=size.note, versions=common.versions(),
        commit=f"{commit_info['id'][:12]}{'-dirty' if commit_info['dirty'] else ''}",
        backends=backends, auto_backend=auto, copy_bandwidth_Bps=copy_bw, timer=common.timer_name(device),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        torch_threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        argv=sys.argv[1:] if argv is None else argv,
        memory_method=("torch.cuda.max_memory_allocated during one step, minus the memory allocated before it"
                       if device.type == "cuda" else
                       "torch.profiler(profile_memory=True) allocation records of torch's CPU allocator during "
                       "one step, peak of their running sum (tracemalloc cannot see torch's allocator)"),
        cpu_ratio_reps=cpu_ratio_reps(size), alpha=ALPHA, beta=BETA, eps=EPS, cpu_count=os.cpu_count(),
        load_average_1min=dict(start=load_start, end=os.getloadavg()[0]),
    )
    report = dict(meta=meta, layer=layer_rows, network=network_rows,
                  paper_table8=paper_comparison(network_rows, auto) if network_rows else [],
                  cpu_ratios=cpu_rows, loss=loss_rows)
    meta["elapsed_s"] = time.perf_counter() - t_start

    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(report)
    (out_dir / "report.md").write_text(markdown + "\n")
    benchmark_json = to_benchmark_json(report, commit_info)
    (out_dir / "report.json").write_text(json.dumps(benchmark_json, indent=1, default=str) + "\n")
    plot_note = write_plot(report, out_dir / "report.png")
    print()
    print(markdown)
    print(f"wrote {out_dir / 'report.md'}, {out_dir / 'report.json'}"
          + (f" ({plot_note})" if plot_note else f", {out_dir / 'report.png'}"))
    errors = error_rows(report)
    if errors:
        print(f"{len(errors)} rows failed (ERROR in the tables above); "
              "VCREG_BENCH_TRACEBACK=1 prints their tracebacks", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(1 if error_rows(main()) else 0)
