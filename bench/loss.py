"""Loss level of SPEC section 7: VICReg's loss on two (n, d) branches, forward + backward, ours
against plain autograd written as facebookresearch/vicreg writes it, in the same run.

    python -m bench.loss                    # full on a GPU; on a CPU the reduced grid (a few minutes on 2 cores)
    python -m bench.loss --size smoke       # seconds: checks that it runs
    python -m bench.loss --shapes 256x8192 --dtypes float32 --reps 7 --out bench/results/<device>

Cases, each one step ``loss = f(z_a, z_b); loss.backward()`` on two leaf embeddings of shape
(n, d) with the gradients set to None first (the defaults 25, 25, 1; gamma 1, eps 1e-4):

* facebook: ``facebook_vicreg_loss``, main_vicreg.py's forward as it is written (F.mse_loss,
  ``x - x.mean(dim=0)``, ``torch.sqrt(x.var(dim=0) + 0.0001)``, ``(x.T @ x) / (batch_size - 1)``,
  ``off_diagonal(cov_x).pow_(2).sum().div(num_features)``), differentiated by autograd; no gather
  (one process);
* ours: ``vcreg_kernels.vicreg_loss`` with ``set_backend(<backend>)``, for each backend of ours that
  runs on the device (``common.benchmarked_backends``: Triton's CPU interpreter is not timed).

Sizes: ``full`` is SPEC section 7's grid, d = 2048 and 8192, n = 256, 512 and 2048, float32 and
bfloat16; ``quick`` (the CPU default) is d = 2048 at every n in float32 and bfloat16, and d = 8192
at n = 256 in float32 (facebookresearch/vicreg's 8192-wide expander at a batch of 256 per
device): the rest of the full grid would take tens of minutes more on a 2-core CPU (an estimate from
the 256 x 8192 row, about two minutes). ``smoke`` is two tiny shapes, one round.

Measurement: the cases are interleaved round by round (a machine's slow moments hit every case
alike); median, p20 and p80 of the rounds. Peak extra memory: bytes allocated during one step
above what was allocated before it (the gradients included; ``common.peak_bytes``), measured twice
on a CPU: "warm", on the thread that ran the timed rounds, and "cold", on a fresh thread, which
also counts the thread-local scratch a kernel keeps between calls (the cpu backend's float64
d x d accumulators); the cold one is the memory the step needs. On a GPU one number
(``torch.cuda.max_memory_allocated``).

bench/report.py's "Loss level" section: ``run_loss_level(size_name, device, log)`` -> rows
(``loss_level_rows`` of them), ``loss_markdown(rows, meta)`` -> the section's Markdown lines.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # Before torch loads libgomp: sleeping OpenMP workers, as bench/report.py explains.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pytest_benchmark.utils import get_commit_info  # noqa: E402

import vcreg_kernels  # noqa: E402

from . import common  # noqa: E402

SIM, STD, COV = 25.0, 25.0, 1.0  # facebookresearch/vicreg's defaults (and ours)
MiB = 1 << 20


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    # main_vicreg.py's: a flattened copy of the off-diagonal elements of a square matrix
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def facebook_vicreg_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """main_vicreg.py's VICReg.forward after the projector, one process (batch_size = n, num_features = d)."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = off_diagonal(cov_x).pow_(2).sum().div(num_features) + off_diagonal(cov_y).pow_(2).sum().div(num_features)
    return SIM * repr_loss + STD * std_loss + COV * cov_loss


@dataclass(frozen=True)
class LossSize:
    name: str
    note: str
    cases: tuple[tuple[int, int, torch.dtype], ...]  # (n, d, dtype)
    warmup: int
    reps: int


def _grid(ns, ds, dtypes):
    return tuple((n, d, dt) for dt in dtypes for d in ds for n in ns)


F32, BF16 = torch.float32, torch.bfloat16
SIZES = {
    "full": LossSize("full", "SPEC section 7's grid: d = 2048 and 8192, n = 256, 512, 2048, float32 and bfloat16",
                     _grid((256, 512, 2048), (2048, 8192), (F32, BF16)), warmup=3, reps=20),
    "quick": LossSize("quick", "reduced for a small CPU: d = 2048 at n = 256, 512, 2048 in float32 and bfloat16; "
                      "d = 8192 at n = 256 in float32 (the rest of the full grid would take tens of minutes more on "
                      "2 cores, estimated from the 256 x 8192 row)",
                      _grid((256, 512, 2048), (2048,), (F32, BF16)) + ((256, 8192, F32),), warmup=1, reps=7),
    "smoke": LossSize("smoke", "smoke test (CI): two tiny shapes, one round; the numbers mean nothing",
                      ((32, 64, F32), (16, 48, BF16)), warmup=0, reps=1),
}


def default_size_name(device: torch.device) -> str:
    return "full" if device.type == "cuda" else "quick"


def impl_keys(device: torch.device) -> list[str]:
    return ["facebook"] + [common.ours_key(b) for b in common.benchmarked_backends(device)]


def impl_label(key: str) -> str:
    return "facebookresearch/vicreg (autograd)" if key == "facebook" else f"ours: {key[5:]}"


def make_inputs(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Two views: z_b = z_a + noise, spread about 1 (the hinges near their threshold), leaves that require grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    z_a = torch.randn(n, d, generator=g, device=device)
    z_b = z_a + 0.5 * torch.randn(n, d, generator=g, device=device)
    return z_a.to(dtype).requires_grad_(), z_b.to(dtype).requires_grad_()


def make_case(key: str, z_a: torch.Tensor, z_b: torch.Tensor) -> common.Case:
    def clear() -> None:
        z_a.grad = z_b.grad = None

    if key == "facebook":
        def step() -> None:
            facebook_vicreg_loss(z_a, z_b).backward()
    else:
        backend = key[len("ours_"):]

        def step() -> None:
            with common.forced_backend(backend):
                vcreg_kernels.vicreg_loss(z_a, z_b, SIM, STD, COV).backward()

    def run() -> None:
        clear()
        step()

    return common.Case(key, impl_label(key), run, clear)


def peak_bytes_cold(case: common.Case, device: torch.device) -> Optional[int]:
    """``common.peak_bytes`` of one step on a fresh thread: thread-local scratch starts empty there
    (and is freed with the thread), so the step's peak counts it. None on a GPU (see the docstring)."""
    if device.type != "cpu":
        return None
    out: dict = {}

    def target() -> None:
        try:
            out["peak"] = common.peak_bytes(case, device)
        except BaseException as e:  # noqa: BLE001  (re-raised on the caller's thread)
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["peak"]


def measure_group(n: int, d: int, dtype: torch.dtype, device: torch.device, size: LossSize,
                  log: Callable[[str], None] = print) -> list[dict]:
    """Rows of one shape and dtype: every case, interleaved rounds, peak memory, and a check of the value."""
    z_a, z_b = make_inputs(n, d, dtype, device)
    keys = impl_keys(device)
    cases = {k: make_case(k, z_a, z_b) for k in keys}
    rows = {k: dict(level="loss", n=n, d=d, dtype=str(dtype)[6:], impl=k, label=cases[k].label, error=None,
                    times_s=[]) for k in keys}
    with torch.no_grad():
        want = facebook_vicreg_loss(z_a.float(), z_b.float()).item()  # float32 statistics, as ours
    live = []
    for k, case in cases.items():
        try:
            case.run()  # first call: compiles/loads, grows the allocator; also the value check
            with torch.no_grad(), common.forced_backend(None if k == "facebook" else k[5:]):
                got = (facebook_vicreg_loss(z_a, z_b) if k == "facebook"
                       else vcreg_kernels.vicreg_loss(z_a, z_b, SIM, STD, COV)).item()
            rows[k]["loss_rel_diff"] = abs(got - want) / abs(want)
            for _ in range(size.warmup):
                case.run()
            live.append(k)
        except Exception as e:  # noqa: BLE001  (one failing implementation must not stop the others)
            rows[k]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    for _ in range(size.reps):
        for k in live:
            rows[k]["times_s"] += common.time_rounds(cases[k].run, device, 1)
    for k in live:
        t = rows[k]["times_s"]
        rows[k].update(**common.spread(t), rounds=len(t), warmup=size.warmup)
        rows[k]["peak_bytes"] = common.peak_bytes(cases[k], device)
        rows[k]["peak_bytes_cold"] = peak_bytes_cold(cases[k], device)
        cases[k].clear()
        common.release_memory(device)
    base = rows["facebook"]
    for k in live:
        r = rows[k]
        r["time_ratio"] = r["median_s"] / base["median_s"] if base.get("median_s") else None
        for field in ("peak_bytes", "peak_bytes_cold"):
            p, p0 = r.get(field), base.get(field)
            r[field.replace("bytes", "ratio")] = p / p0 if p is not None and p0 else None
    for k in keys:
        r = rows[k]
        log(f"  {n:5d} x {d:5d} {r['dtype']:8s} {r['label']:36s} "
            + (r["error"] if r["error"] else
               f"{r['median_s'] * 1e3:9.1f} ms [{r['p20_s'] * 1e3:.1f}, {r['p80_s'] * 1e3:.1f}]  x{r['time_ratio']:.2f}  "
               f"peak {r['peak_bytes'] / MiB:.0f} MiB"
               + (f", cold {r['peak_bytes_cold'] / MiB:.0f} MiB" if r["peak_bytes_cold"] is not None else "")))
    return list(rows.values())


def run_loss_level(size_name: str, device: torch.device, log: Optional[Callable[[str], None]] = print) -> list[dict]:
    """The loss level at ``size_name`` ("full", "quick" or "smoke", as bench/common.py's sizes) on
    ``device``: one row per (n, d, dtype, implementation), see ``measure_group``. ``log``: one line
    per row as it is measured (None: quiet)."""
    return run_loss_level_size(SIZES[size_name], device, log)


def loss_level_rows(size_name: str, device: torch.device) -> int:
    """How many rows ``run_loss_level`` returns (for a progress count)."""
    return len(SIZES[size_name].cases) * len(impl_keys(device))


def _mib(b: Optional[int]) -> str:
    return "-" if b is None else f"{b / MiB:.3g}"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def loss_markdown(rows: list[dict], meta: Optional[dict] = None) -> list[str]:
    """The "Loss level" section of the latency report, as Markdown lines."""
    cold = any(r.get("peak_bytes_cold") is not None for r in rows)
    lines = [
        "## Loss level: VICReg's loss, forward + backward",
        "",
        "`loss = f(z_a, z_b); loss.backward()` on two (n, d) embeddings, gradients set to None first; "
        "facebookresearch/vicreg is main_vicreg.py's loss as written, differentiated by autograd; ours is "
        "`vcreg_kernels.vicreg_loss` on each backend. Rounds interleaved; median [p20, p80]. "
        "× fb: ours over facebookresearch's (time, peak). Peak: MiB allocated during one step above the inputs "
        "(the two gradients included)"
        + ("; warm on the thread that ran the rounds, cold on a fresh thread (counting the kernels' "
           "thread-local scratch: what the step needs)." if cold else "."),
    ]
    if meta:
        lines.append(f"{meta.get('note', '')}".strip())
    lines += ["", "| n × d | dtype | implementation | median [p20, p80] | × fb time | peak MiB | × fb peak "
              + ("| cold peak MiB | × fb cold |" if cold else "|"),
              "| --- | --- | --- | ---: | ---: | ---: | ---: " + ("| ---: | ---: |" if cold else "|")]
    for r in rows:
        head = f"| {r['n']} × {r['d']} | {r['dtype']} | {r['label']} "
        if r["error"]:
            lines.append(head + f"| {r['error']} | | | " + ("| | |" if cold else "|"))
            continue
        spread = f"{r['median_s'] * 1e3:.1f} ms [{r['p20_s'] * 1e3:.1f}, {r['p80_s'] * 1e3:.1f}]"
        lines.append(head + f"| {spread} | {_ratio(r['time_ratio'])} | {_mib(r['peak_bytes'])} | "
                     f"{_ratio(r['peak_ratio'])} |"
                     + (f" {_mib(r['peak_bytes_cold'])} | {_ratio(r['peak_ratio_cold'])} |" if cold else ""))
    lines.append("")
    return lines


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), help="default: full on a GPU, quick on a CPU")
    p.add_argument("--shapes", nargs="+", metavar="NxD", help="instead of the size's grid, e.g. 256x8192")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--reps", type=int, help="interleaved rounds (default: the size's)")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path, help="also write loss.json and loss.md into this folder")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else common.default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size or default_size_name(device)]
    if args.shapes or args.dtypes or args.reps:
        dtypes = [getattr(torch, t) for t in args.dtypes] if args.dtypes else None
        if args.shapes:
            nd = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
            cases = tuple((n, d, dt) for dt in (dtypes or [F32]) for n, d in nd)
        else:
            cases = tuple(c for c in size.cases if dtypes is None or c[2] in dtypes)
        size = LossSize(size.name + " (custom)", "shapes and dtypes from the command line", cases, size.warmup,
                        args.reps or size.reps)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    print(f"VICReg loss level on {common.device_name(device)}: {size.name} ({size.note}); "
          f"{size.reps} interleaved rounds; load average {load:.2f}", flush=True)
    rows = run_loss_level_size(size, device)
    meta = dict(device_name=common.device_name(device), size=size.name, size_note=size.note,
                versions=common.versions(), load_average_1min=dict(start=load, end=os.getloadavg()[0]),
                threads=torch.get_num_threads(), elapsed_s=time.perf_counter() - t0,
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    busy = max(meta["load_average_1min"].values()) > (os.cpu_count() or 1)
    meta["note"] = (f"{meta['device_name']}; torch {meta['versions']['torch']}; {size.reps} rounds; 1-minute load "
                    f"average {load:.2f} at the start, {meta['load_average_1min']['end']:.2f} at the end"
                    + (" (more runnable processes than CPUs: other work shared this machine, so the times are "
                       "noisy; read the ratios between the rows of one shape, measured in the same rounds)" if busy else "")
                    + f"; {meta['elapsed_s']:.0f} s.")
    commit = get_commit_info("vcreg_kernels")
    meta["commit"] = f"{commit['id'][:12]}{'-dirty' if commit['dirty'] else ''}"
    markdown = "\n".join([f"# VICReg loss level: {meta['device_name']}", "",
                          f"- {meta['date']}; `python -m bench.loss {' '.join(argv if argv is not None else sys.argv[1:])}`"
                          f"; commit {meta['commit']}; {size.note}", ""] + loss_markdown(rows, meta))
    print()
    print(markdown)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loss.md").write_text(markdown + "\n")
        (args.out / "loss.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str) + "\n")
        print(f"wrote {args.out / 'loss.md'}, {args.out / 'loss.json'}")
    return rows


def run_loss_level_size(size: LossSize, device: torch.device, log: Optional[Callable[[str], None]] = print) -> list[dict]:
    rows = []
    for n, d, dtype in size.cases:
        rows += measure_group(n, d, dtype, device, size, log or (lambda line: None))
    return rows


if __name__ == "__main__":
    main()
