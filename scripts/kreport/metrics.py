"""The numbers derived from a compiled kernel's resources and machine code (formulas in render.py's
header, numbers in gpus.py): resident programs per SM, bytes in flight, and static ceilings."""

from dataclasses import dataclass


def _round_up(value, unit):
    return -(-value // unit) * unit


@dataclass(frozen=True)
class Residency:
    programs: int  # resident programs (thread blocks) per SM
    limiter: str  # what bounds it: "registers", "warps", "shared memory" or "blocks"


def resident_programs(gpu, registers, shared_bytes, threads):
    """Programs of ``threads`` threads using ``registers`` per thread and ``shared_bytes`` each that
    fit on one SM at once (the CUDA occupancy calculator's rules)."""
    warps = -(-threads // 32)
    regs_per_warp = _round_up(max(registers, 1) * 32, gpu.reg_alloc_unit)
    limits = {
        "warps": gpu.max_warps // warps,
        "blocks": gpu.max_blocks,
        "registers": (gpu.regs_per_sm // regs_per_warp) // warps,
        "shared memory": gpu.smem_per_sm // (_round_up(shared_bytes, gpu.smem_alloc_unit)
                                             + gpu.smem_reserved_per_block),
    }
    if shared_bytes > gpu.smem_per_block:
        limits["shared memory"] = 0
    limiter = min(limits, key=lambda name: limits[name])  # ties: the first named above
    return Residency(limits[limiter], limiter)


def bytes_in_flight_per_sm(residency, loop, threads):
    """Bytes one SM has requested from memory while each resident program waits on one iteration's
    loads (all of an iteration's loads issue before the first use: Triton hoists them)."""
    return residency.programs * loop.load_bytes * threads


def issue_ceiling_tb_s(gpu, loops):
    """Bytes moved per warp-instruction of the streaming loops × warp-instructions issued per second
    by the whole GPU, in TB/s: the bandwidth no schedule can beat. ``loops`` run the same number of
    iterations each (one per column block in every pass), so their bytes and instructions add."""
    instructions = sum(loop.instructions for loop in loops)
    if not instructions:
        return None
    bytes_per_warp_instruction = 32 * sum(loop.bytes_per_thread for loop in loops) / instructions
    return bytes_per_warp_instruction * gpu.warp_instructions_per_s / 1e12


def mufu_ceiling_tb_s(gpu, loops):
    """Likewise for the special-function unit (16 lane-results per clock per SM); None without MUFU."""
    mufu = sum(loop.mufu for loop in loops)
    if not mufu:
        return None
    return 32 * sum(loop.bytes_per_thread for loop in loops) / mufu * gpu.mufu_warp_instructions_per_s / 1e12


def hot_loops(loops):
    """The loops a ceiling is taken over: those with 16-byte loads if any (the aligned fast path;
    CUDA kernels keep a scalar fallback loop beside it), else all streaming loops."""
    wide = [loop for loop in loops if loop.wide_loads]
    return wide or list(loops)


def vector_loads(loops):
    """"yes" if every load of the hot loops is 16 bytes wide, "partly", or "no"."""
    wide = sum(loop.wide_loads for loop in loops)
    narrow = sum(loop.narrow_loads for loop in loops)
    if not wide and not narrow:
        return "-"
    return "yes" if not narrow else ("partly" if wide else "no")


@dataclass(frozen=True)
class KernelNumbers:
    registers: int
    spill_bytes: int  # spill stores + spill loads
    shared: int
    threads: int
    residency: Residency
    loops: int  # streaming loops the ceilings are taken over
    instructions: int  # per iteration of those loops together
    bytes_per_thread: int
    vector_loads: str
    in_flight: int  # bytes per SM, over the loop with the most load bytes
    issue_tb_s: object  # float or None
    mufu_tb_s: object


def numbers(gpu, result, loop_type):
    """KernelNumbers of one compiled kernel (a result of triton_build / cuda_build) on ``gpu``."""
    loops = hot_loops([loop_type(**loop) for loop in result["loops"]])
    threads = result["threads"]
    shared = result.get("shared", result.get("static_smem", 0))
    residency = resident_programs(gpu, result["registers"], shared, threads)
    heaviest = max(loops, key=lambda loop: loop.load_bytes, default=None)
    return KernelNumbers(
        registers=result["registers"], spill_bytes=result["spill_stores"] + result["spill_loads"],
        shared=shared, threads=threads, residency=residency, loops=len(loops),
        instructions=sum(loop.instructions for loop in loops),
        bytes_per_thread=sum(loop.bytes_per_thread for loop in loops),
        vector_loads=vector_loads(loops),
        in_flight=bytes_in_flight_per_sm(residency, heaviest, threads) if heaviest else 0,
        issue_tb_s=issue_ceiling_tb_s(gpu, loops), mufu_tb_s=mufu_ceiling_tb_s(gpu, loops))
