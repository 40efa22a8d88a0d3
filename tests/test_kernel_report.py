"""The kernel report's readers and arithmetic (scripts/kreport): SASS loops, ptxas' report, resident
programs and the static issue ceiling, on hand-written inputs with known answers."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from kreport import cuda_sources, gpus, metrics, sass  # noqa: E402

# A loop (0x0020 → 0x0090) whose body skips a rare rescale (0x0050–0x0060) by a forward branch, a
# 16-byte load and a 2-byte store, then a store-only loop (0x00c0 → 0x00d0): not a streaming loop.
LISTING = """
\t.section\t.text.kern,"ax",@progbits
kern:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
.L_x_1:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   FSETP.GT.AND P0, PT, R4, R9, PT ;
        /*0040*/              @!P0 BRA `(.L_x_2) ;
        /*0050*/                   MUFU.EX2 R9, R4 ;
        /*0060*/                   FMUL R8, R8, R9 ;
.L_x_2:
        /*0070*/                   MUFU.EX2 R5, R5 ;
        /*0080*/                   STG.E.U16 desc[UR4][R6.64], R5 ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
        /*00a0*/                   NOP;
        /*00b0*/                   MOV R3, RZ ;
.L_x_3:
        /*00c0*/                   STG.E desc[UR4][R6.64], RZ ;
        /*00d0*/               @P2 BRA `(.L_x_3) ;
        /*00e0*/                   EXIT ;
\t.section\t.nv.info.kern,"",@"SHT_CUDA_INFO"
\t//----- nvinfo : EIATTR_REQNTID
        /*0000*/ \t.word\t0x00000100
        /*0004*/ \t.word\t0x00000001
        /*0008*/ \t.word\t0x00000001
"""


def test_sass_loops_and_the_fast_path_through_a_body():
    function = sass.parse(LISTING)["kern"]
    assert function.threads == 256
    assert sass.loops(function) == [(0x20, 0x90), (0xc0, 0xd0)]
    (loop,) = sass.streaming_loops(function)  # the store-only loop does not stream
    # Fast path: LDG, FSETP, BRA, MUFU, STG, BRA (the rescale at 0x50–0x60 is skipped).
    assert (loop.instructions, loop.load_bytes, loop.store_bytes) == (6, 16, 2)
    assert (loop.wide_loads, loop.narrow_loads, loop.mufu) == (1, 0, 1)
    assert metrics.vector_loads([loop]) == "yes"


def test_resident_programs_follow_the_occupancy_rules():
    h100 = gpus.H100
    assert metrics.resident_programs(h100, 32, 0, 256) == metrics.Residency(8, "warps")
    assert metrics.resident_programs(h100, 64, 0, 256) == metrics.Residency(4, "registers")
    assert metrics.resident_programs(h100, 48, 0, 256).programs == 5  # 48·32 = 1536 per warp: 42 warps
    assert metrics.resident_programs(h100, 32, 100 * 1024, 128) == metrics.Residency(2, "shared memory")
    assert metrics.resident_programs(h100, 16, 0, 32) == metrics.Residency(32, "blocks")
    assert metrics.resident_programs(gpus.A100, 32, 200 * 1024, 128).programs == 0  # over the per-block limit


def test_issue_ceiling_of_the_v1_forward_kl_loop():
    # 566 instructions moving 2 × 16-byte loads per thread per iteration (bf16, 8 warps): the
    # v1 kernel's count, 3.78 TB/s at 132 SMs × 1.98 GHz × 4 warp-instructions per clock.
    loop = sass.LoopBody(0, 0, 566, 64, 0, 4, 0, 34, 40, 10)
    assert metrics.issue_ceiling_tb_s(gpus.H100, [loop]) == pytest.approx(3.783, abs=1e-3)
    # MUFU issues at 16 lanes per clock per SM, an eighth of the 4 × 32 of the schedulers.
    ratio = metrics.mufu_ceiling_tb_s(gpus.H100, [loop]) / metrics.issue_ceiling_tb_s(gpus.H100, [loop])
    assert ratio == pytest.approx(566 / 34 / 8, rel=1e-9)
    assert metrics.issue_ceiling_tb_s(gpus.H100, []) is None


def test_ptxas_reports_are_read_per_function():
    # The report is pinned to the Triton of the CPU machines (Makefile); a GPU machine's may differ.
    cuda_build = pytest.importorskip("kreport.cuda_build")
    triton_build = pytest.importorskip("kreport.triton_build")
    log = """ptxas info    : Compiling entry function '_Z1av' for 'sm_90'
ptxas info    : Function properties for _Z1av
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1bv' for 'sm_90'
ptxas info    : Used 40 registers, used 0 barriers"""
    entries = cuda_build.split_log(log)
    assert list(entries) == ["_Z1av", "_Z1bv"]
    assert triton_build.ptxas_resources(entries["_Z1av"]) == {
        "registers": 255, "stack": 8, "spill_stores": 12, "spill_loads": 4, "static_smem": 2048}
    assert triton_build.ptxas_resources(entries["_Z1bv"])["spill_stores"] == 0


def test_any_spill_fails_the_gate():
    from types import SimpleNamespace

    from kreport import gate

    clean = {"ok": True, "spill_stores": 0, "spill_loads": 0}
    spilling = {"ok": True, "spill_stores": 16, "spill_loads": 16}
    collected = SimpleNamespace(case_errors=[], uncovered=[], cuda_errors=[], cuda_rows=[], triton_rows=[
        (90, None, "kd_backward_kernel", "BLOCK_V=4096", "a", clean),
        (90, None, "sinkhorn_tile_forward_kernel", "BLOCK_N=128 BLOCK_M=128", "b", spilling)])
    reasons = gate.failures(collected)
    assert len(reasons) == 1 and "sinkhorn_tile_forward_kernel" in reasons[0] and "spills 16" in reasons[0]


def test_global_functions_are_found_behind_launch_bounds_with_calls(tmp_path):
    source = tmp_path / "k.cu"
    source.write_text("__global__ void __launch_bounds__(kMaxThreads, min_blocks(DIV))\n"
                      "    two_pass_kernel(Args args) {}\n"
                      "template <int B> __global__ void __launch_bounds__(256) tiled_kernel(float* x) {}\n"
                      "__global__ void plain_kernel(int n) {}  // __global__ void commented_kernel(int n)\n")
    assert cuda_sources.global_functions(source) == ["plain_kernel", "tiled_kernel", "two_pass_kernel"]
