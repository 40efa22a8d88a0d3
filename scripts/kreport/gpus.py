"""The numbers the report assumes about the GPUs it compiles for. Every derived column (resident
programs, bytes in flight, issue ceilings) comes from these; render.py prints them at the top of
the report, so a reader can redo any number by hand.

Sources: the CUDA C++ Programming Guide's tables of compute capabilities 8.0 and 9.0 (registers,
warps, blocks and shared memory per SM; 4 warp schedulers per SM, each issuing one warp-instruction
per clock; 16 special-function results per clock per SM), and for the H100 the machine this project
borrows (/work/.library/device/KINDS.md, 2026-11-13: 132 SMs, a device-to-device copy at about
3.0 TB/s counting bytes read and written; an H200 of the same family clocked its SMs at 1980 MHz
under load). The A100 has not been measured here: datasheet numbers.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    arch: int  # compute capability × 10, the Triton / nvcc target
    name: str
    sms: int
    clock_ghz: float  # SM clock under load (boost)
    bandwidth_tb_s: float  # memory bandwidth the floors divide by
    bandwidth_source: str
    smem_per_sm: int  # bytes of shared memory blocks can use on one SM (largest carve-out)
    smem_per_block: int  # the most one block may opt into
    # Architectural limits common to sm_80 and sm_90.
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_regs_per_thread: int = 255
    max_warps: int = 64
    max_blocks: int = 32
    smem_reserved_per_block: int = 1024  # the CUDA runtime keeps 1 KiB of every block's shared memory
    smem_alloc_unit: int = 128
    issue_per_clock: int = 4  # warp-instructions issued per clock per SM (one per scheduler)
    mufu_per_clock: int = 16  # special-function (MUFU: ex2, lg2, rcp, ...) lane-results per clock per SM
    memory_latency_ns: float = 600.0  # loaded DRAM latency, for the bytes-in-flight need (a rough figure)

    @property
    def warp_instructions_per_s(self):
        return self.issue_per_clock * self.clock_ghz * 1e9 * self.sms

    @property
    def mufu_warp_instructions_per_s(self):
        return self.mufu_per_clock / 32 * self.clock_ghz * 1e9 * self.sms

    @property
    def bytes_in_flight_needed_per_sm(self):
        """Little's law: bandwidth × latency, shared by the SMs."""
        return self.bandwidth_tb_s * 1e12 * self.memory_latency_ns * 1e-9 / self.sms


H100 = Gpu(90, "H100 SXM (sm_90)", sms=132, clock_ghz=1.98, bandwidth_tb_s=3.0,
           bandwidth_source="measured copy on this project's H100, 2026-11-13",
           smem_per_sm=228 * 1024, smem_per_block=227 * 1024)
A100 = Gpu(80, "A100 SXM 80 GB (sm_80)", sms=108, clock_ghz=1.41, bandwidth_tb_s=2.04,
           bandwidth_source="datasheet peak (no A100 measured here)",
           smem_per_sm=164 * 1024, smem_per_block=163 * 1024)

GPUS = {gpu.arch: gpu for gpu in (H100, A100)}
ARCHS = tuple(GPUS)  # (90, 80): the report's targets, in this order

# The issue's target for every logits kernel at bf16, V = 128256 on sm_90 (docs/perf-notes.md): a
# static issue ceiling comfortably above the ~3.0 TB/s the H100 moves, so issue never binds.
TARGET_TB_S = 3.75
