"""Block configurations: the heuristic choice per kernel, and the short lists the autotuner times.

The heuristic configuration (``*_config``) is what runs under the interpreter, under
``torch.use_deterministic_algorithms(True)``, during CUDA-graph capture, and what the static
checks (tools/triton_aot_check.py) compile per SPEC section-7 shape. Elsewhere on a GPU,
``triton.autotune`` times ``stats_tuning`` / ``apply_tuning`` once per key (bucketed d and n,
dtype, layout, precision mode) and, where the installed Triton can (``cache_results``), keeps the
choice on disk so a restart does not time again.

Sizes are in threads, not warps: num_warps = threads / the target's warp size (32 on NVIDIA, 64
on AMD), so a program has as many threads, and each thread as much of a tile, on either vendor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .precision import has_matrix_units


@dataclass(frozen=True)
class Config:
    """Compile-time block sizes of one kernel (``blocks``: the kernel's BLOCK_* constexprs) and its
    launch shape; ``per_sm``: programs one SM holds at once (the stats schedule's wave)."""

    blocks: tuple
    threads: int
    num_stages: int
    per_sm: int = 1

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def launch(self, target: Optional[tuple]) -> dict:
        """num_warps and num_stages for ``target`` ((backend, arch); None: the interpreter)."""
        warp = 64 if target is not None and target[0] == "hip" else 32
        return {"num_warps": min(16, max(1, self.threads // warp)), "num_stages": self.num_stages}


def cfg(threads: int, num_stages: int, per_sm: int = 1, **blocks: int) -> Config:
    return Config(tuple(sorted(blocks.items())), threads, num_stages, per_sm)


def _stages(target: Optional[tuple], nvidia: int, amd: int = 2) -> int:
    if target is None:
        return 1
    return amd if target[0] == "hip" else nvidia


def _fma_only(target: Optional[tuple]) -> bool:
    return not has_matrix_units(target)


def stats_block_d(d: int, mode: str, target: Optional[tuple]) -> int:
    """The feature tile of the stats pass (tuning never changes it: it fixes the partial sums' shape).
    128 wherever there are matrix units, whatever d: below 128 features the pass is bound by
    memory, not by the products a smaller tile would save."""
    if mode == "fp64" or _fma_only(target):
        return 32
    return 128


def _ampere(target: Optional[tuple]) -> bool:
    """sm_8x: mma.sync keeps both operands of every product in registers, so a step takes half
    (16-bit) or a quarter (float32 operands) of Hopper's samples to stay clear of spills."""
    return target is not None and target[0] == "cuda" and int(target[1]) < 90


def stats_config(d: int, mode: str, target: Optional[tuple] = None) -> Config:
    """128 x 128 feature tiles, 64 samples per step (32 with float32 operands or the three products
    of bf16x3, to stay within one SM's registers and shared memory), a 3-stage cp.async ring
    (8 warps: 4 HGMMA m64n128k16 per warp per step)."""
    if mode == "fp64":
        return cfg(256, 1, BLOCK_D=32, BLOCK_S=8)
    if _fma_only(target):
        return cfg(256, 1, BLOCK_D=32, BLOCK_S=16)
    bs = 64 if mode in ("bf16", "fp16") else 32
    if _ampere(target):
        bs //= 2
    return cfg(256, _stages(target, 3), BLOCK_D=128, BLOCK_S=bs)


def stats_tuning(d: int, mode: str, target: Optional[tuple]) -> list[Config]:
    """What the autotuner times for the stats pass (the heuristic first): on NVIDIA the ring one
    stage deeper (on AMD a third stage spills)."""
    first = stats_config(d, mode, target)
    if mode == "fp64" or _fma_only(target) or target is None or target[0] != "cuda":
        return [first]
    return [first, cfg(first.threads, first.num_stages + 1, first.per_sm, **dict(first.blocks))]


def apply_choices(d: int, mode: str, target: Optional[tuple] = None, gathered: bool = False,
                  pair: bool = False) -> list[Config]:
    """The GEMM tiles the heuristic chooses between: 128 or 64 samples x 128 output columns x 64
    reduction columns (32 with float32 operands or bf16x3; 16 on sm_8x), 8 warps, a 3-stage ring.
    ``gathered``: grad_y and grad_x in a layout without 16-byte runs (the rows copy's inputs), whose
    epilogue holds an address per element: 64 samples only, to stay clear of spills. ``pair``: the
    VICReg pair apply, whose epilogue holds a tile of each branch beside the accumulator: on sm_8x
    (mma.sync keeps the operands in registers) 64 samples only, as 128 spill there."""
    if mode == "fp64":
        return [cfg(256, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=8)]
    if _fma_only(target):
        return [cfg(256, 1, BLOCK_M=64, BLOCK_N=32, BLOCK_K=16)]
    bk = 64 if mode in ("bf16", "fp16") else 16 if _ampere(target) else 32
    if target is None:
        return [cfg(256, 1, BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk)]
    narrow = gathered or (pair and _ampere(target))
    return [cfg(256, _stages(target, 3), BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk) for bm in ((64,) if narrow else (128, 64))]


def apply_config(d: int, mode: str, target: Optional[tuple] = None, n: Optional[int] = None,
                 num_sms: Optional[int] = None, gathered: bool = False, pair: bool = False) -> Config:
    """Of ``apply_choices``, the tile whose whole waves of tiles take least time (model: waves x
    BLOCK_M, a tile's time in proportion to its samples); the first (128 samples, which reads G
    half as often) unless another saves 5%."""
    choices = apply_choices(d, mode, target, gathered, pair)
    if n is None or num_sms is None:
        return choices[0]

    def cost(c: Config) -> float:
        tiles = -(-n // c["BLOCK_M"]) * -(-d // c["BLOCK_N"])
        return -(-tiles // num_sms) * c["BLOCK_M"] * (1.0 if c is choices[0] else 1.05)

    return min(choices, key=cost)


def apply_tuning(d: int, mode: str, target: Optional[tuple], n: Optional[int] = None,
                 num_sms: Optional[int] = None, gathered: bool = False, pair: bool = False) -> list[Config]:
    """The heuristic choice first, the other tile, and (NVIDIA) the ring one stage deeper."""
    first = apply_config(d, mode, target, n, num_sms, gathered, pair)
    choices = apply_choices(d, mode, target, gathered, pair)
    out = [first] + [c for c in choices if c != first]
    if target is not None and target[0] == "cuda" and mode != "fp64" and not _fma_only(target):
        out.append(cfg(256, first.num_stages + 1, **dict(choices[0].blocks)))
    return out


def finalize_config(d: int, mode: str, target: Optional[tuple] = None) -> Config:
    """Blocks of BLOCK_F x BLOCK_F of the d x d result (16 where d is small, so that enough programs
    share the merge), BLOCK_C segments merged at a time."""
    bf = 16 if d <= 256 else 32
    bc = (8 if bf == 16 else 4) // (2 if mode == "fp64" else 1)
    return cfg(128, _stages(target, 2, 1), BLOCK_F=bf, BLOCK_C=bc)


def operand_config(d: int, mode: str, target: Optional[tuple] = None) -> Config:
    return cfg(128, 1, BLOCK_J=16, BLOCK_K=128 if mode != "fp64" else 64)


def invariance_config(target: Optional[tuple] = None) -> Config:
    """The invariance sum's tiles: 2048 elements (8 per thread, 16 bytes and more per load), 4
    programs per SM; 256 under the interpreter, so that small tests span several programs."""
    return cfg(256, _stages(target, 3), per_sm=4, BLOCK=256 if target is None else 2048)


def sum_config(target: Optional[tuple] = None) -> Config:
    return cfg(128, 1, BLOCK=128)


def copy_config(target: Optional[tuple] = None) -> Config:
    return cfg(256, 1, BLOCK_S=64, BLOCK_D=64)


def bucket(value: int) -> int:
    """The autotuner's key for a size: the power of two at or above it."""
    return 1 << max(0, (int(value) - 1).bit_length())
