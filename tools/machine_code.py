"""Read the machine code of a Triton kernel compiled ahead of time, without a GPU.

NVIDIA: registers, stack frame (where spilled registers go) and the SASS from one
``cuobjdump -res-usage -sass`` of the cubin (the cuobjdump Triton ships). AMD: ``.vgpr_count`` /
``.vgpr_spill_count`` / scratch from the amdgcn text. Both: the kernel's innermost loops that
hold matrix instructions, with what one pass through such a loop (one step) issues:

    mma          matrix instructions (HGMMA: Hopper wgmma; HMMA: Ampere mma.sync; v_mfma: AMD)
    mma_n64      HGMMA with N >= 64 (the product's own; N = 16 ones are the row sums' small products)
    mma_types    the operand types of the matrix instructions (BF16, F16, TF32, ...)
    loads        global loads by width in bytes: LDG / LDGSTS (cp.async) / UTMALDG (TMA) on NVIDIA,
                 global_load_* / buffer_load_* on AMD
    async_depth  cp.async groups the step's wait leaves in flight (``DEPBAR.LE SB0, N``): N + 1
                 copies are on their way while the step computes (0: none)
    instructions the step's length in instructions

and from the TTGIR, the shared-memory buffers that async copies fill (``2x128x64`` = 2 buffers).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class Loop:
    start: int
    end: int
    mma: int = 0
    mma_n64: int = 0
    mma_types: set = field(default_factory=set)
    loads: dict = field(default_factory=dict)  # "LDGSTS.16" (kind.bytes) -> count
    async_depth: int = 0
    tma: int = 0
    instructions: int = 0

    def load_bytes(self) -> tuple[int, int]:
        """(bytes per thread loaded by 16-byte instructions, by narrower ones) in one step."""
        wide = narrow = 0
        for key, count in self.loads.items():
            width = int(key.rsplit(".", 1)[1])
            if width >= 16:
                wide += width * count
            else:
                narrow += width * count
        return wide, narrow


@dataclass
class Reading:
    regs: int
    spills: int  # stack + local bytes per thread (NVIDIA) or spilled VGPRs (AMD): what goes to memory
    stack: int
    shared: int
    loops: list  # innermost loops holding matrix instructions
    buffers: list  # TTGIR shared buffers filled by async copies, e.g. "3x128x64xbf16"
    mma_anywhere: str  # the kind of matrix instruction in the kernel, or "-"


# ------------------------------------------------------------------ NVIDIA


def cuobjdump(cubin: bytes) -> tuple[dict, str]:
    """(resources, SASS) of a cubin: ``cuobjdump -res-usage -sass`` (REG, STACK: the stack frame,
    where ptxas puts spilled registers, LOCAL)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", "-sass", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {res.stderr[-2000:]}")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res.stdout)
    if not m:
        raise RuntimeError("cuobjdump -res-usage printed no resource line")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3))}, res.stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _sass_instructions(text: str) -> list[tuple[int, str, str]]:
    return [(int(m.group(1), 16), m.group(2), m.group(3).strip())
            for m in map(_SASS_LINE.search, text.splitlines()) if m]


def _width(op: str, default: int) -> int:
    for suffix, width in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return width
    return default


def _nvidia_loop(ins, lo: int, hi: int) -> Loop:
    loop = Loop(lo, hi)
    for addr, op, args in ins:
        if not lo <= addr <= hi:
            continue
        loop.instructions += 1
        if op.startswith(("HGMMA", "HMMA")):
            loop.mma += 1
            text = op + args.split(",")[0].replace(" ", "")  # "HGMMA.64x128x16.F32.BF16R24"
            shape = re.search(r"HGMMA\.\d+x(\d+)x\d+", text)
            if shape and int(shape.group(1)) >= 64:
                loop.mma_n64 += 1
            loop.mma_types.update(re.findall(r"\.(BF16|F16|TF32|E4M3|E5M2|S8)(?=[.R]|$)", text))
        elif op.startswith("LDGSTS"):
            key = f"LDGSTS.{_width(op, 4)}"
            loop.loads[key] = loop.loads.get(key, 0) + 1
        elif op.startswith("LDG") and not op.startswith("LDGDEPBAR"):
            key = f"LDG.{_width(op, 4)}"
            loop.loads[key] = loop.loads.get(key, 0) + 1
        elif op.startswith(("UTMALDG", "UBLKCP")):
            loop.tma += 1
            loop.loads["UTMALDG.16"] = loop.loads.get("UTMALDG.16", 0) + 1
        elif op.startswith("DEPBAR") and "SB0" in args:
            m = re.search(r"SB0,\s*0x([0-9a-f]+)", args)
            if m:
                loop.async_depth = max(loop.async_depth, int(m.group(1), 16) + 1)
    return loop


def _innermost_mma_loops(spans, summarise) -> list:
    """Loops (start, end) holding matrix instructions that hold no other such loop."""
    loops = [summarise(lo, hi) for lo, hi in spans]
    with_mma = [lp for lp in loops if lp.mma]
    return [lp for lp in with_mma
            if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in with_mma)]


def _buffers(ttgir: str) -> list[str]:
    """Multi-buffered shared allocations that async copies (cp.async or TMA) write."""
    allocs = {}
    for m in re.finditer(r"(%[\w#]+) = ttg\.local_alloc[^\n]*?!ttg\.memdesc<([0-9x]+)x(\w+)", ttgir):
        allocs[m.group(1)] = f"{m.group(2)}x{m.group(3)}"
    filled = set()
    for m in re.finditer(r"(?:ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local)[^\n]*", ttgir):
        line = m.group(0)
        for name in allocs:
            if re.search(re.escape(name) + r"\b", line):
                filled.add(name)
    # the copies often write a subview (memdesc_index) of the allocation: follow one step
    for m in re.finditer(r"(%[\w#]+) = ttg\.memdesc_(?:index|subview)\s+(%[\w#]+)", ttgir):
        view, base = m.group(1), m.group(2)
        if base in allocs and re.search(r"async_(?:tma_)?copy_global_to_local[^\n]*" + re.escape(view) + r"\b", ttgir):
            filled.add(base)
    return sorted(allocs[name] for name in filled)


def read_nvidia(compiled) -> Reading:
    res, text = cuobjdump(compiled.asm["cubin"])
    ins = _sass_instructions(text)
    spans = []
    for addr, op, args in ins:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) <= addr:
                spans.append((int(m.group(1), 16), addr))
    loops = _innermost_mma_loops(spans, lambda lo, hi: _nvidia_loop(ins, lo, hi))
    ops = {op.split(".")[0] for _, op, _ in ins}
    kind = "HGMMA" if "HGMMA" in ops else "HMMA" if "HMMA" in ops else "DMMA" if "DMMA" in ops else "-"
    return Reading(res["regs"], res["stack"] + res["local"], res["stack"], compiled.metadata.shared, loops,
                   _buffers(compiled.asm.get("ttgir", "")), kind)


# ------------------------------------------------------------------ AMD


_AMD_LOAD = re.compile(r"^\s*(global_load|buffer_load)_(dwordx4|dwordx3|dwordx2|dword|ushort|short_d16\w*|ubyte|sbyte|sshort|b128|b96|b64|b32|u16|b16)\b")
_AMD_WIDTH = {"dwordx4": 16, "b128": 16, "dwordx3": 12, "b96": 12, "dwordx2": 8, "b64": 8, "dword": 4, "b32": 4,
              "ushort": 2, "sshort": 2, "u16": 2, "b16": 2, "ubyte": 1, "sbyte": 1}


def read_amd(compiled) -> Reading:
    asm = compiled.asm["amdgcn"]

    def meta(key):
        m = re.search(rf"\.{key}:\s+(\d+)", asm)
        return int(m.group(1)) if m else 0

    scratch = re.search(r"ScratchSize:\s+(\d+)", asm)
    lines = asm.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\.?L\w+):", line)
        if m:
            labels[m.group(1)] = i
    spans = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*s_(?:cbranch_\w+|branch)\s+(\.?L\w+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            spans.append((labels[m.group(1)], i))

    def summarise(lo, hi):
        loop = Loop(lo, hi)
        for line in lines[lo:hi + 1]:
            s = line.strip()
            if not s or s.startswith((";", ".")) or s.endswith(":"):
                continue
            loop.instructions += 1
            if s.startswith("v_mfma"):
                loop.mma += 1
                loop.mma_n64 += 1
                m = re.match(r"v_mfma_\w+?_\d+x\d+x\d+(?:_\d+)?(\w+)", s)
                loop.mma_types.add(m.group(1).lstrip("_") if m else "?")
            m = _AMD_LOAD.match(line)
            if m:
                width = _AMD_WIDTH.get(m.group(2), 2)
                key = f"{m.group(1)}.{width}"
                loop.loads[key] = loop.loads.get(key, 0) + 1
        return loop

    loops = _innermost_mma_loops(spans, summarise)
    return Reading(meta("vgpr_count"), meta("vgpr_spill_count"), int(scratch.group(1)) if scratch else 0,
                   compiled.metadata.shared, loops, _buffers(compiled.asm.get("ttgir", "")),
                   "MFMA" if "v_mfma" in asm else "-")


def read(compiled, target: tuple) -> Reading:
    return read_nvidia(compiled) if target[0] == "cuda" else read_amd(compiled)
