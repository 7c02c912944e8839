"""Compile, into Triton's cache and in parallel, what the SPEC section-7 shapes launch on this
machine's GPU: every kernel at the heuristic configurations and the autotuner's, float32 under
torch's "highest" and "high" and bfloat16. A GPU session's first calls then find their kernels
compiled (Triton's JIT looks the same source, specialisation and options up in the same cache),
instead of compiling them one after another.

    python tools/triton_warm_cache.py [--jobs N]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.common import PAPER_SHAPES  # noqa: E402
from vcreg_kernels import triton_kernels as tk  # noqa: E402

SETTINGS = (("float32", "highest"), ("float32", "high"), ("bfloat16", "highest"))


def _cases(target, num_sms):
    seen, out = set(), []
    for shape in PAPER_SHAPES:
        for dtype, setting in SETTINGS:
            torch.set_float32_matmul_precision(setting)
            for case in tk.aot_cases_for(shape.shape, shape.dim, getattr(torch, dtype), target, num_sms, tuning=True):
                key = (case.kernel.fn.__name__, str(sorted(case.signature.items())),
                       str(sorted((k, str(v)) for k, v in case.constexprs.items())), str(case.attrs),
                       case.num_warps, case.num_stages)
                if key not in seen:
                    seen.add(key)
                    out.append(case)
    return out


_CASES: list = []


def _init(target, num_sms):
    _CASES.extend(_cases(target, num_sms))


def _compile(i):
    case, target = _CASES[i], triton.runtime.driver.active.get_current_target()
    t = time.time()
    try:
        triton.compile(ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=case.attrs),
                       target=target, options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        return None, time.time() - t
    except Exception as e:  # noqa: BLE001 - a case that fails here fails (and is reported) at its first call too
        return f"{case.label}: {type(e).__name__}: {str(e)[-300:]}", time.time() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    target = triton.runtime.driver.active.get_current_target()
    target = (target.backend, target.arch)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    t0 = time.time()
    n = len(_cases(target, num_sms))
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs), initializer=_init, initargs=(target, num_sms)) as pool:
        results = pool.map(_compile, range(n), chunksize=1)
    failed = [err for err, _ in results if err]
    for err in failed:
        print("FAILED", err, file=sys.stderr)
    print(f"warmed Triton's cache for {target}: {n} kernels in {time.time() - t0:.0f} s "
          f"({sum(t for _, t in results):.0f} s of compiling), {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
