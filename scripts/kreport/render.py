"""docs/kernel-report.md from the compile results: the method and its numbers first, then the gate,
the target table, and one table per kernel family and architecture."""

import re
import shutil
import subprocess
from collections import defaultdict

from . import gpus, metrics, sass, triton_cases

FAMILY_ORDER = ("kd_rows", "kl_div", "ce", "sparse_kd", "sinkhorn")
TARGET_CASE = dict(dtype="bfloat16", size="V=128256", arch=90)


_DTYPES = {"0": "f32", "1": "f16", "2": "bf16", "3": "f64"}  # csrc's DType enum


def demangle(names):
    """Short readable names of CUDA kernels: `kl_forward_kernel<bf16, bf16, true>` (c++filt, if present)."""
    if not names or shutil.which("c++filt") is None:
        return list(names)
    plain = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = []
    for name in plain:
        name = re.sub(r"^void |\(anonymous namespace\)::|fastkd::", "", name)
        name = re.sub(r"\(DType\)(\d)", lambda m: _DTYPES.get(m.group(1), m.group(0)), name)
        short.append(name.split("(")[0] if "(" in name else name)
    return short


def _tb(value):
    return "-" if value is None else f"{value:.2f}"


def _kib(value):
    return f"{value / 1024:.0f}" if value else "0"


def method(toolchain):
    gpu_rows = "\n".join(
        f"| sm_{g.arch} | {g.name} | {g.sms} | {g.clock_ghz:.2f} | {g.warp_instructions_per_s / 1e12:.3f} | "
        f"{g.mufu_warp_instructions_per_s / 1e12:.3f} | {g.bandwidth_tb_s:.2f} ({g.bandwidth_source}) | "
        f"{g.smem_per_sm // 1024} / {g.smem_per_block // 1024} | {g.bytes_in_flight_needed_per_sm / 1024:.1f} |"
        for g in gpus.GPUS.values())
    c = triton_cases
    cases = dict(vocabs=", ".join(map(str, c.VOCABS)), rows=c.ROWS, batch=c.BATCH, sequence=c.SEQUENCE,
                 sizes="{" + ", ".join(map(str, c.SINKHORN_SIZES)) + "}", problems=c.SINKHORN_PROBLEMS,
                 sparse_vocabs=" and ".join(map(str, c.SPARSE_VOCABS)), top_k=c.SPARSE_TOP_K)
    return f"""## How the numbers are made

Every Triton kernel is compiled for each target with `triton.compile` at exactly the
specialisation its launcher would launch: the launchers (found through the capability registry)
are called on meta tensors at the sizes below, their kernel launches are recorded instead of run,
and Triton's own argument binder turns the recorded arguments into the compile's signature,
constexprs and attributes (16-byte pointer alignment, integers divisible by 16, integers equal to 1).
Every `__global__` function of csrc/ is compiled with nvcc (`-cubin -arch=sm_NN -Xptxas -v`, the
flags of setup.py). The machine code is read with nvdisasm. Toolchain: {toolchain}.

Cases (scripts/kreport/triton_cases.py): the logits families at V = {cases['vocabs']}, fp32 and bf16, as
contiguous rows (N = {cases['rows']}, no labels) and as the shifted view `logits[:, :-1]` of ({cases['batch']}, {cases['sequence']}, V)
with labels; V = 32000 and 128256 are both multiples of 16 and share one specialisation (their
rows are merged). The sparse (top-k) teacher's tail-mode passes at V = {cases['sparse_vocabs']}, k = {cases['top_k']},
fp32 and bf16, on contiguous rows. Sinkhorn at n = m ∈ {cases['sizes']}, B = {cases['problems']} problems, a shared (n, m) or a
batched (B, n, m) fp32 cost, with every gradient mode (none, envelope, unrolled with and without
the cost gradient) and the plan returned or not.

Per kernel:
- **regs, spill, smem**: ptxas' report (`-v`): registers per thread, spill stores + loads in
  bytes, shared memory per program (Triton: what it allocates; CUDA: static, launch-time dynamic
  shared memory not included).
- **streaming loops**: innermost loops of the SASS that load from global memory, each iteration
  counted along its fast path (fewest instructions from the loop head to its backward branch;
  Triton's loops have no branch inside, so this is the whole body). Where a kernel has loops with
  16-byte loads (`LDG.E.128`; PTX `ld.global.v4`), only those count (CUDA kernels keep a scalar
  fallback loop for unaligned rows beside the vector one). **16 B loads**: every load of those
  loops is 16 bytes wide (yes), some (partly), none (no).
- **programs/SM**: resident programs (thread blocks) per SM, the least of: 64 warps; 32 blocks;
  registers (65536, allocated per warp in units of 256); shared memory (per-program allocation
  rounded to 128 bytes plus the 1 KiB the runtime reserves per block). The limiter is named.
- **in flight/SM**: programs/SM × the bytes one program loads in one iteration of its heaviest
  loop (Triton issues an iteration's loads before their first use), in KiB. Little's law asks for
  bandwidth × latency / SMs (last column below, at an assumed {gpus.H100.memory_latency_ns:.0f} ns).
- **B/instr**: bytes loaded and stored per thread in one iteration of the counted loops together
  (each runs once per block of columns: the passes of a row advance in step) over their
  instructions, × 32 lanes: bytes moved per warp-instruction.
- **issue TB/s**: the static issue ceiling, B/instr × 4 warp-instructions per clock per SM ×
  clock × SMs: the bandwidth the kernel could not exceed even if every instruction issued at the
  scheduler's full rate and memory were free. Below the memory bandwidth, the kernel is
  issue-bound before it is memory-bound. **MUFU TB/s**: the same for the special-function unit
  (ex2, lg2, rcp: 16 lane-results per clock per SM).

| target | GPU assumed | SMs | clock GHz | warp-instr/s (10¹²) | MUFU warp-instr/s (10¹²) | memory TB/s | smem KiB per SM / block | in flight needed KiB/SM |
|---|---|---|---|---|---|---|---|---|
{gpu_rows}

The logits target: every logits kernel at bf16, V = 128256 on sm_90 has an issue ceiling of at
least {gpus.TARGET_TB_S} TB/s (docs/perf-notes.md).
"""


def _case_columns(case):
    return (case.direction, case.variant, case.dtype, case.layout)


def triton_table(rows, gpu, loop_type=sass.LoopBody):
    """rows: [(case, kernel short name, description, result)] of one family and arch; cases with the
    same compiled specialisation and the same columns share a row, their sizes joined."""
    merged = defaultdict(list)
    order = []
    for case, kernel, description, key, result in rows:
        group = (_case_columns(case), kernel, key)
        if group not in merged:
            order.append(group)
        merged[group].append((case, description, result))
    lines = ["| direction | variant | dtype | layout | sizes | kernel | specialisation | regs | spill B | smem B | "
             "16 B loads | programs/SM (limit) | in flight KiB/SM | B/instr | issue TB/s | MUFU TB/s |",
             "|" + "---|" * 16]
    for group in order:
        entries = merged[group]
        case, description, result = entries[0]
        sizes = ", ".join(dict.fromkeys(entry[0].size for entry in entries))
        head = f"| {case.direction} | {case.variant} | {case.dtype} | {case.layout} | {sizes} | `{group[1]}` | " \
               f"{description} |"
        if not result["ok"]:
            lines.append(f"{head} **compile error**: {result['error']} |" + " |" * 8)
            continue
        n = metrics.numbers(gpu, result, loop_type)
        lines.append(f"{head} {n.registers} | {n.spill_bytes or 0} | {n.shared} | {n.vector_loads} | "
                     f"{n.residency.programs} ({n.residency.limiter}) | {_kib(n.in_flight)} | "
                     f"{_per_instruction(n)} | {_tb(n.issue_tb_s)} | {_tb(n.mufu_tb_s)} |")
    return "\n".join(lines)


def _per_instruction(n):
    return f"{32 * n.bytes_per_thread / n.instructions:.2f}" if n.instructions else "-"


def target_table(rows, before=None):
    """The logits kernels at the target case: issue ceilings against TARGET_TB_S."""
    gpu = gpus.GPUS[TARGET_CASE["arch"]]
    lines = ["| family | direction | variant | layout | kernel | loop instr | B/instr | issue TB/s | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, kernel, _, _, result in rows:
        if not result["ok"]:
            lines.append(f"| {case.family} | {case.direction} | {case.variant} | {case.layout} | `{kernel}` | "
                         f"- | - | compile error | missed |")
            continue
        n = metrics.numbers(gpu, result, sass.LoopBody)
        met = n.issue_tb_s is not None and n.issue_tb_s >= gpus.TARGET_TB_S
        lines.append(f"| {case.family} | {case.direction} | {case.variant} | {case.layout} | `{kernel}` | "
                     f"{n.instructions} | {_per_instruction(n)} | {_tb(n.issue_tb_s)} | {'met' if met else '**missed**'} |")
    return "\n".join(lines)


def cuda_table(rows, gpu):
    """rows: [(source, demangled name, result)] of one architecture."""
    lines = ["| source | kernel | regs | spill B | static smem B | threads (bound) | 16 B loads | programs/SM (limit) | "
             "in flight KiB/SM | B/instr | issue TB/s | MUFU TB/s |", "|" + "---|" * 12]
    for source, name, result in rows:
        head = f"| {source} | `{name}` |"
        if result is None:
            lines.append(f"{head} **compile error** |" + " |" * 9)
            continue
        n = metrics.numbers(gpu, result, sass.LoopBody)
        lines.append(f"{head} {n.registers} | {n.spill_bytes} | {n.shared} | {n.threads} | {n.vector_loads} | "
                     f"{n.residency.programs} ({n.residency.limiter}) | {_kib(n.in_flight)} | "
                     f"{_per_instruction(n)} | {_tb(n.issue_tb_s)} | {_tb(n.mufu_tb_s)} |")
    return "\n".join(lines)
