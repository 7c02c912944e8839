"""Compile the triton backend's kernels ahead of time for real GPU targets on a machine without a
GPU (SPEC section 6), report their resources, and check the structure of the stats and apply
loops at every SPEC section-7 shape (TRITON_DESIGN.md's static checks).

    python tools/triton_aot_check.py [--targets cuda:80,cuda:90,hip:gfx906,hip:gfx90a,hip:gfx942]
                                     [--jobs N] [--out out/] [--filter TEXT]

Two sets of compilations, each compiled once:

* every configuration the host code can launch (``vcreg_kernels.triton_kernels.aot_cases``; the
  autotuner's alternatives on sm_90): the resource report, ``triton_resources.md``: registers,
  spills, shared memory, matrix instructions;
* what one backward launches at each section-7 shape (``aot_cases_for``: bench/common.py's
  PAPER_SHAPES, float32 under torch's "highest" and "high" and bfloat16), and what one VICReg
  loss launches at each section-7 loss shape (``aot_cases_for(..., vicreg=True)``: bench/loss.py's
  full grid, (n, d) branches), on sm_90 (132 SMs), sm_80 (108), gfx90a (104) and gfx942 (304):
  ``triton_static_checks.md``, the innermost loops of the stats, apply and pair apply kernels
  (tools/machine_code.py), checked for

      mma    matrix instructions in the loop; on sm_90 >= 4 HGMMA (N >= 64) per warp per step
      pipe   NVIDIA: >= 2 cp.async copies in flight (the step's wait leaves >= 1 group) or TMA
      spill  0 bytes
      16B    NVIDIA: the loop's global loads 16 bytes wide (narrower ones carry <= 1/8 of its bytes;
             on AMD reported: there mu's per-step loads land in each thread's own layout)
      tf32   float32 under "high": TF32 matrix instructions (NVIDIA; xf32 MFMA on gfx942)
      wave   the stats grid fills >= 85% of its wave, unless the schedule gives every program its
             minimum of sample tiles (launch.STATS_MIN_STEPS) and still has fewer programs than
             the wave's slots: a pass too small to fill one (the loss's n = 256 on 304 CUs)

Reports go to ``out/`` at the repository root (ignored by git) unless ``--out`` names another
folder. Exits 1 when a case fails to compile or spills, or a check falls short.
"""
from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the caller's environment

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import machine_code  # noqa: E402
from vcreg_kernels import triton_kernels as tk  # noqa: E402
from vcreg_kernels.triton_kernels.precision import matmul_precision  # noqa: E402

CHECK_TARGETS = {("cuda", 90): 132, ("cuda", 80): 108, ("hip", "gfx90a"): 104, ("hip", "gfx942"): 304}
# The autotuner's alternatives are compiled for these (it skips, on the user's GPU, a configuration
# that fails to compile there; each alternative adds a compilation per dtype, precision and layout).
TUNING_TARGETS = (("cuda", 90),)
CHECK_DTYPES = (("float32", "highest"), ("float32", "high"), ("bfloat16", "highest"))


def _parse_target(text: str) -> tuple:
    backend, arch = text.split(":")
    return (backend, int(arch) if backend == "cuda" else arch)


def _paper_shapes():
    from bench.common import PAPER_SHAPES

    return PAPER_SHAPES


def _loss_shapes():
    """The VICReg loss's (n, d) branches of SPEC section 7 (bench/loss.py's full grid), as shapes."""
    from bench.common import LayerShape
    from bench.loss import SIZES

    sizes = sorted({(n, d) for n, d, _ in SIZES["full"].cases}, key=lambda nd: (nd[1], nd[0]))
    return tuple(LayerShape(f"VICReg n={n} d={d}", (n, d), -1) for n, d in sizes)


def _key(target, case):
    return (target, case.kernel.fn.__name__, tuple(sorted(case.signature.items())),
            tuple(sorted((k, str(v)) for k, v in case.constexprs.items())), tuple(sorted(case.attrs)),
            case.num_warps, case.num_stages)


def _check_cases(targets):
    """[(target, shape name, dtype name, setting, case)] of the static checks."""
    out = []
    for target in targets:
        if target not in CHECK_TARGETS:
            continue
        for vicreg, shapes in ((False, _paper_shapes()), (True, _loss_shapes())):
            for shape in shapes:
                for dtype, setting in CHECK_DTYPES:
                    with matmul_precision(setting):
                        cases = tk.aot_cases_for(shape.shape, shape.dim, getattr(torch, dtype), target,
                                                 CHECK_TARGETS[target], vicreg=vicreg)
                    seen = set()  # the pair's two branches launch the same stats compilation
                    for c in cases:
                        if _key(target, c) not in seen:
                            seen.add(_key(target, c))
                            out.append((target, shape, dtype, setting, c))
    return out


_UNIQUE: list = []


def _init_worker(targets, filt):
    _UNIQUE.extend(_unique_cases(targets, filt)[0])


def _unique_cases(targets, filt):
    """(unique (target, case) list, resource-report entries, check entries) in a fixed order."""
    index, unique = {}, []

    def add(target, case):
        k = _key(target, case)
        if k not in index:
            index[k] = len(unique)
            unique.append((target, case))
        return index[k]

    report = [(t, c.label, add(t, c)) for t in targets for c in tk.aot_cases(t, tuning=t in TUNING_TARGETS)
              if filt in c.label]
    checks = [(t, shape, dtype, setting, c, add(t, c)) for t, shape, dtype, setting, c in _check_cases(targets)
              if filt in c.label]
    return unique, report, checks


def _compile(i: int):
    target, case = _UNIQUE[i]
    backend, arch = target
    t0 = time.time()
    try:
        src = ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=case.attrs)
        compiled = triton.compile(src, target=GPUTarget(backend, arch, 32 if backend == "cuda" else 64),
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        return machine_code.read(compiled, target), time.time() - t0, None
    except Exception as e:  # noqa: BLE001 - reported per case, the run fails at the end
        return None, time.time() - t0, f"{type(e).__name__}: {str(e)[-600:]}"


# ------------------------------------------------------------------ the checks


def _macs_per_step(case) -> int:
    c = case.constexprs
    if "BLOCK_D" in c and "BLOCK_S" in c:
        return c["BLOCK_D"] * c["BLOCK_D"] * c["BLOCK_S"]
    return c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"]


def _wave(case, slots: int) -> float:
    """Stats: the stream-K schedule's balance (programs x the longest program's units vs all units)
    times the share of the wave's slots it fills; apply: tiles over whole waves of ``slots``."""
    programs = case.grid[0]
    if case.label.startswith("stats"):
        return min(1.0, programs / slots) if programs else 0.0
    waves = -(-programs // slots)
    return programs / (waves * slots)


def _stats_at_floor(case, shape) -> bool:
    """Whether the stats grid is as wide as its work allows: every program at the schedule's
    minimum of sample tiles (``launch.STATS_MIN_STEPS``)."""
    from vcreg_kernels.triton_kernels import launch

    d = shape.shape[shape.dim]
    n = math.prod(shape.shape) // d
    nb = -(-d // case.constexprs["BLOCK_D"])
    work = nb * (nb + 1) // 2 * -(-n // case.constexprs["BLOCK_S"])
    return case.grid[0] == max(1, work // launch.STATS_MIN_STEPS)


def _checks(target, dtype, setting, case, reading) -> dict:
    """{check: (passed, shown)} for one stats or apply case."""
    nvidia = target[0] == "cuda"
    res = {}
    loops = reading.loops
    if not loops:
        return {"mma": (False, "no matrix loop")}
    if target == ("cuda", 90):
        worst = min(lp.mma_n64 for lp in loops)
        res["mma"] = (worst >= 4, f"{worst} HGMMA")
    else:
        worst = min(lp.mma for lp in loops)
        res["mma"] = (worst >= 1, f"{worst} {reading.mma_anywhere}")
    if nvidia:
        depth = min(max(lp.async_depth, 2 if lp.tma else 0) for lp in loops)
        res["pipe"] = (depth >= 2, f"{depth} in flight, {'/'.join(reading.buffers) or '-'}")
    else:
        res["pipe"] = (True, "/".join(reading.buffers) or "registers")
    res["spill"] = (reading.spills == 0 and reading.stack == 0, str(reading.spills))
    wide = sum(lp.load_bytes()[0] for lp in loops)
    narrow = sum(lp.load_bytes()[1] for lp in loops)
    res["16B"] = (narrow * 8 <= wide or not nvidia, f"{wide}/{wide + narrow} B")
    if dtype == "float32" and setting == "high" and (nvidia or target[1] == "gfx942"):
        types = set().union(*(lp.mma_types for lp in loops))
        tf32 = any("TF32" in t.upper() or "XF32" in t.upper() for t in types)
        res["tf32"] = (tf32, ",".join(sorted(types)))
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(f"{b}:{a}" for b, a in tk.AOT_TARGETS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--filter", default="", help="only cases whose label contains this")
    parser.add_argument("--out", default=str(ROOT / "out"), help="folder for the reports (default: out/, ignored)")
    args = parser.parse_args(argv)
    targets = [_parse_target(t) for t in args.targets.split(",") if t]
    t0 = time.time()
    unique, report, checks = _unique_cases(targets, args.filter)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, args.jobs), initializer=_init_worker, initargs=(targets, args.filter)) as pool:
        results = pool.map(_compile, range(len(unique)), chunksize=1)
    elapsed = time.time() - t0
    failures = [(unique[i], r[2]) for i, r in enumerate(results) if r[2] is not None]
    spills = [unique[i] for i, r in enumerate(results) if r[0] is not None and (r[0].spills or r[0].stack)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_resources(out / "triton_resources.md", targets, report, results, elapsed, len(unique), failures, spills)
    short = _write_checks(out / "triton_static_checks.md", checks, results)
    for (tg, case), err in failures:
        print(f"FAILED {tg} {case.label}: {err}", file=sys.stderr)
    for tg, case in spills:
        print(f"SPILLS {tg} {case.label}", file=sys.stderr)
    for line in short:
        print(f"CHECK {line}", file=sys.stderr)
    print(f"{len(unique)} compilations in {elapsed:.0f} s: {len(failures)} failed, {len(spills)} spilled, "
          f"{len(short)} static checks short; reports in {out}")
    return 1 if failures or spills or short else 0


def _write_resources(path, targets, report, results, elapsed, n_unique, failures, spills):
    lines = [
        "# Triton kernels: ahead-of-time resource report", "",
        f"`python tools/triton_aot_check.py`, {datetime.date.today().isoformat()}, triton {triton.__version__}: "
        f"{n_unique} distinct compilations in {elapsed:.0f} s, {len(failures)} failed, {len(spills)} spilled.",
        "Cases: `vcreg_kernels.triton_kernels.aot_cases` (every configuration the host code can launch; the "
        "autotuner's alternatives on " + ", ".join(f"{b} {a}" for b, a in TUNING_TARGETS) + "). `regs`: registers "
        "per thread (cuobjdump -res-usage) or VGPRs incl. AGPRs (AMD); `spill`: stack and local bytes per thread, "
        "where spilled registers go (NVIDIA), or spilled VGPRs (AMD); `stack`: stack frame or scratch bytes; "
        "`smem`: shared memory (Triton metadata); `matrix`: HGMMA / HMMA / MFMA anywhere in the kernel.", ""]
    for target in targets:
        lines += [f"## {target[0]} {target[1]}", "", "| case | regs | spill | stack | smem | matrix |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for tg, label, i in report:
            if tg != target:
                continue
            reading, _, err = results[i]
            if err is not None:
                lines.append(f"| {label} | FAILED: {err.splitlines()[0][:160]} | | | | |")
            else:
                lines.append(f"| {label} | {reading.regs} | {reading.spills} | {reading.stack} | {reading.shared} | "
                             f"{reading.mma_anywhere} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _write_checks(path, checks, results) -> list[str]:
    short = []
    lines = ["# Triton kernels: static checks at the SPEC section-7 shapes", "",
             "What one backward launches (`aot_cases_for`) per shape, dtype and torch precision setting, compiled "
             "ahead of time; the innermost loops of the stats, apply and pair apply kernels read from the machine code "
             "(tools/machine_code.py). `mma`: matrix instructions per warp per step (sm_90: HGMMA with N >= 64); "
             "`pipe`: cp.async copies in flight during a step, and the shared buffers they fill; `16B`: bytes per "
             "thread per step loaded by 16-byte instructions / all; `ins/MMAC`: the step's instructions per million "
             "multiply-adds of the program's tile; `wave`: the share of the wave's slots the grid fills (stats: the "
             "stream-K programs; apply: tiles over whole waves). A check that falls short is marked **NO**.", ""]
    current = None
    for target, shape, dtype, setting, case, i in checks:
        if not (case.label.startswith(("stats", "apply")) or case.label == "pair_apply") or case.label == "stats copy":
            continue
        if target != current:
            current = target
            lines += ["", f"## {target[0]} {target[1]} ({CHECK_TARGETS[target]} SMs)", "",
                      "| shape | dtype | pass | mma | pipe | spill | 16B | tf32 | regs | smem | ins/MMAC | wave |",
                      "| --- | --- | --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
        reading, _, err = results[i]
        what = f"{shape.name} {tuple(shape.shape)}"
        dt = dtype if dtype != "float32" else f"float32 {setting}"
        if err is not None:
            lines.append(f"| {what} | {dt} | {case.label} | FAILED | | | | | | | | |")
            short.append(f"{target} {what} {dt} {case.label}: failed to compile")
            continue
        res = _checks(target, dtype, setting, case, reading)
        slots = CHECK_TARGETS[target] * (2 if case.num_warps <= 4 and target[0] == "cuda" else 1)
        wave = _wave(case, CHECK_TARGETS[target] if case.label.startswith("stats") else slots)
        if case.label.startswith("stats"):
            small = wave < 0.85 and _stats_at_floor(case, shape)
            res["wave"] = (wave >= 0.85 or small, f"{wave:.2f}" + (" (all the work there is)" if small else ""))
        ins = max(lp.instructions for lp in reading.loops) * 1e6 / _macs_per_step(case) if reading.loops else 0

        def cell(name):
            if name not in res:
                return "-"
            ok, shown = res[name]
            return shown if ok else f"**NO** {shown}"

        for name, (ok, shown) in res.items():
            if not ok:
                short.append(f"{target} {what} {dt} {case.label}: {name} {shown}")
        lines.append(f"| {what} | {dt} | {case.label} | {cell('mma')} | {cell('pipe')} | {cell('spill')} | {cell('16B')} | "
                     f"{cell('tf32')} | {reading.regs} | {reading.shared} | {ins:.0f} | "
                     f"{cell('wave') if 'wave' in res else f'{wave:.2f}'} |")
    path.write_text("\n".join(lines) + "\n")
    return short


if __name__ == "__main__":
    sys.exit(main())
