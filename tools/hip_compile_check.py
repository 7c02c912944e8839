#!/usr/bin/env python
"""Compile the `cuda` backend's device code for AMD GPUs, without a GPU or a ROCm torch (SPEC section 6).

csrc/cuda/vcreg_kernels.cuh holds every kernel and includes no torch header, so it can be
translated with torch's own hipify (torch.utils.hipify, what a ROCm build of the extension runs)
and compiled with hipcc for gfx906 (MI50) on the CPU machine. One translation unit instantiates
every kernel for every dtype (through the header's ``kernel_table<T>``), with torch's HIP flags.

Prints each kernel's resources from the code object metadata (VGPRs, SGPRs, spills, LDS,
scratch) and fails when hipify or hipcc fails, when a kernel spills or uses scratch, or when a
kernel of the header is missing from the code object. ``--cuda`` does the same for NVIDIA targets
with nvcc and ``ptxas -v`` (the header alone, so seconds instead of the extension's minutes).

    python tools/hip_compile_check.py                 # gfx906; needs hipcc (apt-get install -y hipcc)
    python tools/hip_compile_check.py --install       # installs hipcc with apt-get first if it is missing
    python tools/hip_compile_check.py --arch gfx906 --arch gfx90a --cuda sm_80 --cuda sm_90

Idempotent: everything is built in a fresh temporary directory (``--keep DIR`` to keep it).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "cuda" / "vcreg_kernels.cuh"
DTYPES = ["float", "double", "__half", "vcreg::cuda::bf16"]
# Flags of a torch extension build (torch.utils.cpp_extension COMMON_HIP(CC)_FLAGS / COMMON_NVCC_FLAGS).
HIP_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-D__HIP_PLATFORM_AMD__=1", "-DUSE_ROCM=1", "-DCUDA_HAS_FP16=1",
             "-D__HIP_NO_HALF_OPERATORS__=1", "-D__HIP_NO_HALF_CONVERSIONS__=1"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def instantiation_source(header_name: str) -> str:
    lines = [f'#include "{header_name}"']
    lines += [f"template int vcreg::cuda::kernel_table<{t}>(const void**);" for t in DTYPES]
    return "\n".join(lines) + "\n"


def expected_kernels() -> set[str]:
    """The base names of the __global__ functions declared in the header."""
    text = HEADER.read_text()
    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\(\w+\)\s+)?(\w+)\s*\(", text))


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [re.sub(r"\(.*", "", o).replace("vcreg::cuda::", "").replace("void ", "") for o in out]


def run(cmd: list[str], env=None, cwd=None) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)


def ensure_hipcc(install: bool) -> str:
    hipcc = shutil.which("hipcc")
    if hipcc is None and install:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "hipcc"]):
            r = run(cmd)
            if r.returncode != 0:
                sys.exit(f"hip_compile_check: `{' '.join(cmd)}` failed:\n{r.stdout}{r.stderr}")
        hipcc = shutil.which("hipcc")
    if hipcc is None:
        sys.exit("hip_compile_check: hipcc not found; `apt-get install -y hipcc` (or pass --install)")
    return hipcc


def hipify_header(work: Path) -> Path:
    from torch.utils.hipify import hipify_python

    src = work / "src"
    src.mkdir()
    shutil.copy(HEADER, src / HEADER.name)
    result = hipify_python.hipify(project_directory=str(src), output_directory=str(work / "hip"), includes=["*"],
                                  is_pytorch_extension=True, show_detailed=False, show_progress=False)
    (res,) = result.values()
    if res.hipified_path is None or "ok" not in str(res.status):
        sys.exit(f"hip_compile_check: hipify failed on {HEADER.name}: {res.status}")
    return Path(res.hipified_path)


def amdgpu_metadata(asm: str) -> list[dict]:
    """Per-kernel entries of the amdhsa.kernels list in the code object's metadata (YAML in the .s)."""
    section = asm.split("amdhsa.kernels:", 1)[1].split(".end_amdgpu_metadata", 1)[0]
    kernels = []
    for chunk in re.split(r"\n  - ", section)[1:]:
        keys = dict(re.findall(r"^\s{0,4}\.(\w+):\s+(\S+)$", chunk, flags=re.M))
        if "name" in keys:
            kernels.append(keys)
    return kernels


def check_hip(arch: str, hipcc: str, work: Path, header: Path) -> list[str]:
    tu = work / f"kernels_{arch}.hip"
    tu.write_text(instantiation_source(header.name))
    env = dict(os.environ, HIP_PLATFORM="amd")
    r = run([hipcc, f"--offload-arch={arch}", *HIP_FLAGS, "-c", tu.name, "-o", f"kernels_{arch}.o", "-save-temps"],
            env=env, cwd=work)
    if r.returncode != 0:
        return [f"hipcc for {arch} failed:\n{r.stdout}{r.stderr}"]
    (asm_file,) = work.glob(f"kernels_{arch}-hip-amdgcn-amd-amdhsa-{arch}.s")
    kernels = amdgpu_metadata(asm_file.read_text())
    names = demangle([k["name"] for k in kernels])
    report(f"\n### {arch}: {len(kernels)} kernels (wavefront {kernels[0].get('wavefront_size', '?') if kernels else '?'})\n")
    report("| kernel | VGPR | SGPR | spill VGPR/SGPR | LDS bytes | scratch bytes |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    errors = []
    for k, name in sorted(zip(kernels, names), key=lambda kn: kn[1]):
        vs, ss = int(k.get("vgpr_spill_count", 0)), int(k.get("sgpr_spill_count", 0))
        lds, scratch = int(k.get("group_segment_fixed_size", 0)), int(k.get("private_segment_fixed_size", 0))
        report(f"| `{name}` | {k.get('vgpr_count', '?')} | {k.get('sgpr_count', '?')} | {vs}/{ss} | {lds} | {scratch} |")
        if vs or ss or scratch:
            errors.append(f"{arch}: {name} spills ({vs} VGPR, {ss} SGPR) or uses scratch ({scratch} bytes)")
    errors += missing(expected_kernels(), names, arch)
    return errors


REPORT: list[str] = []


def report(line: str) -> None:
    """Print a line of the Markdown resource report and keep it for ``--out``."""
    print(line)
    REPORT.append(line)


def check_cuda(sm: str, work: Path) -> list[str]:
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists():
        return [f"nvcc not found for {sm} (set CUDA_HOME)"]
    num = sm.removeprefix("sm_")
    tu = work / f"kernels_{sm}.cu"
    tu.write_text(instantiation_source(str(HEADER)))
    r = run([str(nvcc), *NVCC_FLAGS, f"-gencode=arch=compute_{num},code=sm_{num}", "-Xptxas", "-v", "-c", tu.name,
             "-o", f"kernels_{sm}.o"], cwd=work)
    if r.returncode != 0:
        return [f"nvcc for {sm} failed:\n{r.stdout}{r.stderr}"]
    rows, name, spill = [], None, (0, 0, 0)
    for line in r.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spill = tuple(map(int, m.groups()))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((name, int(m.group(1)), spill, int(smem.group(1)) if smem else 0))
            name = None
    names = demangle([r_[0] for r_ in rows])
    report(f"\n### {sm}: {len(rows)} kernels\n")
    report("| kernel | registers | stack bytes | spill store/load bytes | smem bytes |\n| --- | ---: | ---: | ---: | ---: |")
    errors = []
    for (mangled, regs, (stack, st, ld), smem), nm in sorted(zip(rows, names), key=lambda rn: rn[1]):
        report(f"| `{nm}` | {regs} | {stack} | {st}/{ld} | {smem} |")
        if st or ld or stack:
            errors.append(f"{sm}: {nm} spills ({st}/{ld} bytes) or uses a stack frame ({stack} bytes)")
    errors += missing(expected_kernels(), names, sm)
    return errors


def missing(expected: set[str], names: list[str], target: str) -> list[str]:
    found = {re.sub(r"<.*", "", n).strip() for n in names}
    return [f"{target}: kernel {k} of {HEADER.name} is not in the code object" for k in sorted(expected - found)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", help="AMD target (default gfx906); repeatable")
    ap.add_argument("--cuda", action="append", default=[], help="also report an NVIDIA target, e.g. sm_90")
    ap.add_argument("--install", action="store_true", help="apt-get install hipcc if it is missing")
    ap.add_argument("--keep", type=Path, help="build in this directory (emptied first) and keep it")
    ap.add_argument("--out", type=Path, help="also write the resource report (Markdown) to this file")
    args = ap.parse_args()
    archs = args.arch or ["gfx906"]
    hipcc = ensure_hipcc(args.install)
    with tempfile.TemporaryDirectory(prefix="vcreg_hip_check_") as tmp:
        work = Path(tmp)
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            args.keep.mkdir(parents=True)
            work = args.keep.resolve()
        header = hipify_header(work)
        work = header.parent
        errors = []
        for arch in archs:
            errors += check_hip(arch, hipcc, work, header)
        for sm in args.cuda:
            errors += check_cuda(sm, work)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Resources of the CUDA kernels' device code ({HEADER.relative_to(ROOT)})\n\n"
            f"Written by `python tools/hip_compile_check.py {' '.join(sys.argv[1:])}` on "
            f"{datetime.date.today()}: hipify + hipcc for AMD targets, nvcc -Xptxas -v for NVIDIA ones.\n"
            + "\n".join(REPORT) + "\n")
    if errors:
        print("\nFAILED:\n" + "\n".join(errors), file=sys.stderr)
        return 1
    print(f"\nOK: {HEADER.relative_to(ROOT)} compiles for {', '.join(archs + args.cuda)} with no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
