"""tools/machine_code.py, the reader behind tools/triton_aot_check.py's static checks, on small
hand-written pieces of SASS, TTGIR and amdgcn: loops, matrix instructions and their shapes, load
widths, cp.async depth, the buffers async copies fill."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
machine_code = pytest.importorskip("machine_code")

SASS = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   DEPBAR.LE SB0, 0x2 ;
        /*0120*/                   LDGSTS.E.BYPASS.128 [R19], desc[UR12][R4.64], P1 ;
        /*0130*/                   LDG.E.U16 R7, desc[UR4][R2.64] ;
        /*0140*/                   WARPGROUP.ARRIVE ;
        /*0150*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR24].tnspB, R24 ;
        /*0160*/                   HGMMA.64x16x16.F32.BF16 R96, R116, gdesc[UR48].tnspB, R96 ;
        /*0170*/                   LDGDEPBAR ;
        /*0180*/               @P0 BRA 0x110 ;
        /*0190*/                   HGMMA.64x128x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*01a0*/                   BRA 0x100 ;
        /*01b0*/                   EXIT ;
"""


def test_sass_loops_and_what_one_step_issues():
    ins = machine_code._sass_instructions(SASS)
    assert ins[0] == (0x100, "MOV", "R1, c[0x0][0x28]")
    spans = [(0x110, 0x180), (0x100, 0x1A0)]
    loops = machine_code._innermost_mma_loops(spans, lambda lo, hi: machine_code._nvidia_loop(ins, lo, hi))
    assert [(lp.start, lp.end) for lp in loops] == [(0x110, 0x180)]  # the outer loop holds the inner one
    lp = loops[0]
    assert lp.mma == 2 and lp.mma_n64 == 1 and lp.mma_types == {"BF16"}
    assert lp.loads == {"LDGSTS.16": 1, "LDG.2": 1}  # LDGDEPBAR is no load
    assert lp.async_depth == 3 and lp.instructions == 8
    assert lp.load_bytes() == (16, 2)
    outer = machine_code._nvidia_loop(ins, 0x100, 0x1A0)
    assert "TF32" in outer.mma_types


TTGIR = """
    %xi = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared1, #smem, mutable>
    %xo = ttg.local_alloc : () -> !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable>
    %xi_1 = ttg.memdesc_index %xi[%c0_i32] : !ttg.memdesc<3x128x64xbf16> -> !ttg.memdesc<128x64xbf16>
    %xi_2 = ttg.async_copy_global_to_local %ptrs, %xi_1 mask %m : tensor<128x64x!tt.ptr<bf16>> -> <128x64xbf16>
"""


def test_ttgir_buffers_filled_by_async_copies():
    assert machine_code._buffers(TTGIR) == ["3x128x64xbf16"]


AMDGCN = """
_apply_kernel:
	s_load_dwordx2 s[0:1], s[4:5], 0x0
.LBB0_2:
	global_load_dwordx4 v[10:13], v[2:3], off
	buffer_load_dword v14, v15, s[8:11], 0 offen
	v_mfma_f32_32x32x8_bf16 a[0:15], v[20:21], v[22:23], a[0:15]
	s_cbranch_scc1 .LBB0_2
	s_endpgm
	.vgpr_count:     212
	.vgpr_spill_count: 0
	ScratchSize: 0
"""


def test_amdgcn_loop_and_resources():
    compiled = SimpleNamespace(asm={"amdgcn": AMDGCN, "ttgir": ""}, metadata=SimpleNamespace(shared=32768))
    reading = machine_code.read_amd(compiled)
    assert reading.regs == 212 and reading.spills == 0 and reading.mma_anywhere == "MFMA"
    (lp,) = reading.loops
    assert lp.mma == 1 and lp.loads == {"global_load.16": 1, "buffer_load.4": 1}
    assert "bf16" in lp.mma_types
