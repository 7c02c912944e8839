"""Compile every Triton kernel of the ``triton`` backend ahead of time, for real GPU targets, on a
machine without a GPU (SPEC section 6), and write the resource report.

    python tools/triton_aot_check.py [--targets cuda:80,cuda:90,hip:gfx906,hip:gfx90a,hip:gfx942]
                                     [--jobs N] [--out out/triton_resources.md]

The cases come from ``vcreg_kernels.triton_kernels.aot_cases`` (which reads the same ``CONFIGS``
table as the dispatching host code), so every configuration the host code can launch is compiled.
Per case: registers and spills (``ptxas -v`` on the PTX, with the ptxas that Triton ships, for
NVIDIA; ``.vgpr_count`` / ``.vgpr_spill_count`` / ``.sgpr_spill_count`` / scratch of the amdgcn
for AMD), shared memory (Triton's metadata), and whether matrix instructions appear (HMMA /
HGMMA: ``mma.sync`` / ``wgmma`` in the PTX; MFMA: ``v_mfma`` in the amdgcn). Exits 1 when a case
fails to compile or spills to memory (NVIDIA spill bytes, AMD VGPR spills or scratch); AMD SGPR
spills into VGPR lanes (no memory traffic) are reported in their own column.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the caller's environment

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vcreg_kernels import triton_kernels as tk  # noqa: E402


def _parse_target(text: str) -> tuple:
    backend, arch = text.split(":")
    return (backend, int(arch) if backend == "cuda" else arch)


def _ptxas() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _nvidia_resources(ptx: str, arch: int) -> dict:
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        # the flags Triton's own make_cubin passes
        res = subprocess.run([_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", str(src),
                              "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {
        "regs": int(regs.group(1)) if regs else -1,
        "spills": (int(spill_st.group(1)) if spill_st else 0) + (int(spill_ld.group(1)) if spill_ld else 0),
        "stack": int(stack.group(1)) if stack else 0,
        "matrix": ("HGMMA" if "wgmma.mma_async" in ptx else "")
        or ("DMMA" if re.search(r"mma\.sync\S*\.f64", ptx) else "") or ("HMMA" if "mma.sync" in ptx else "") or "-",
    }


def _amd_resources(asm: str) -> dict:
    def meta(key):
        m = re.search(rf"\.{key}:\s+(\d+)", asm)
        return int(m.group(1)) if m else 0

    scratch = re.search(r"ScratchSize:\s+(\d+)", asm)
    return {
        "regs": meta("vgpr_count"),
        "spills": meta("vgpr_spill_count"),  # VGPR spills go to scratch memory
        # SGPR spills go to lanes of a VGPR (no memory traffic): reported, not failed on.
        "sgpr_spills": meta("sgpr_spill_count"),
        "stack": int(scratch.group(1)) if scratch else 0,
        "matrix": "MFMA" if "v_mfma" in asm else "-",
    }


def compile_case(target: tuple, case: tk.AOTCase) -> dict:
    backend, arch = target
    warp = 32 if backend == "cuda" else 64
    t = time.time()
    src = ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=case.attrs)
    compiled = triton.compile(src, target=GPUTarget(backend, arch, warp),
                              options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    row = {"shared": compiled.metadata.shared, "seconds": time.time() - t}
    row.update(_nvidia_resources(compiled.asm["ptx"], arch) if backend == "cuda" else _amd_resources(compiled.asm["amdgcn"]))
    return row


def _work(item):
    target, index = item
    case = list(tk.aot_cases(target))[index]
    try:
        return target, case.label, case.num_warps, case.num_stages, compile_case(target, case), None
    except Exception as e:  # noqa: BLE001 - reported per case, the run fails at the end
        return target, case.label, case.num_warps, case.num_stages, None, f"{type(e).__name__}: {str(e)[-800:]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(f"{b}:{a}" for b, a in tk.AOT_TARGETS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--filter", default="", help="only cases whose label contains this")
    parser.add_argument("--out", default=str(ROOT / "out" / "triton_resources.md"),
                        help="the resource report (default: out/, ignored by git; "
                        "bench/results/triton_resources.md updates the committed one)")
    args = parser.parse_args(argv)
    targets = [_parse_target(t) for t in args.targets.split(",") if t]
    items = [(tg, i) for tg in targets for i, c in enumerate(tk.aot_cases(tg)) if args.filter in c.label]
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, args.jobs)) as pool:
        results = pool.map(_work, items, chunksize=1)
    failures = [r for r in results if r[5] is not None]
    spills = [r for r in results if r[4] is not None and (r[4]["spills"] > 0 or r[4]["stack"] > 0)]
    sgpr = [r for r in results if r[4] is not None and r[4].get("sgpr_spills", 0) > 0]

    lines = [
        "# Triton kernels: ahead-of-time resource report",
        "",
        f"Generated by `python tools/triton_aot_check.py` on {datetime.date.today().isoformat()}, "
        f"triton {triton.__version__}, {len(results)} compilations in {time.time() - t0:.0f} s, "
        f"{len(failures)} failed, {len(spills)} spilled to memory, {len(sgpr)} with SGPR-to-VGPR-lane spills (AMD).",
        "Cases come from `vcreg_kernels.triton_kernels.aot_cases` (the `CONFIGS` table). `regs`: registers per thread "
        "(NVIDIA, ptxas -v, Triton's own flags) or VGPRs incl. AGPRs (AMD); `spill`: spilled bytes (NVIDIA) or "
        "spilled VGPRs (AMD; these go to scratch memory); `sgpr`: SGPRs spilled into VGPR lanes (AMD; no memory "
        "traffic); `stack`: stack frame (NVIDIA) or scratch bytes (AMD); `smem`: shared memory / LDS bytes (Triton metadata); "
        "`matrix`: HGMMA (wgmma) / HMMA (mma.sync) in the PTX, MFMA in the amdgcn. 'unaligned' = d and strides not "
        "multiples of 16 (scalar loads), e.g. L = 49 or 196.",
        "",
    ]
    for target in targets:
        lines += [f"## {target[0]} {target[1]}", "", "| case | warps | stages | regs | spill | sgpr | stack | smem | matrix |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for tg, label, warps, stages, row, err in results:
            if tg != target:
                continue
            if err is not None:
                lines.append(f"| {label} | {warps} | {stages} | FAILED: {err.splitlines()[0][:200]} | | | | | |")
            else:
                sg = row.get("sgpr_spills", "-")
                lines.append(f"| {label} | {warps} | {stages} | {row['regs']} | {row['spills']} | {sg} | {row['stack']} | "
                             f"{row['shared']} | {row['matrix']} |")
        lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    for tg, label, _, _, row, err in failures:
        print(f"FAILED {tg} {label}: {err}", file=sys.stderr)
    for tg, label, _, _, row, _ in spills:
        print(f"SPILLS {tg} {label}: {row}", file=sys.stderr)
    print(f"{len(results)} compiled in {time.time() - t0:.0f} s: {len(failures)} failed, {len(spills)} spilled to "
          f"memory, {len(sgpr)} with AMD SGPR-to-VGPR spills; report in {out}")
    return 1 if failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
