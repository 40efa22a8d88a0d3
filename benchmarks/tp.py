"""The tensor-parallel (vocab-parallel) fused linear KD benchmark of issue 14.

Two parts:

  * Counted, from formulas (every machine): bytes each rank hands to collectives per token and
    per-rank peak workspace of the loss, at N = 8192, V = 128256, Hs = Ht = 4096, bf16, TP = 2
    and 8, for three ways to get the forward KL over a vocabulary split across ranks:
      fastkd          fused_linear_kd_loss(process_group=): per token block, per-row statistics
                      all-reduced (fastkd/kernels/fused_linear/vocab_parallel.py)
      megatron        the unfused Megatron-style vocab-parallel KL (``megatron_kl`` below): each
                      rank's (N, V/TP) logits, row max and Σexp all-reduced, fp32 softmaxes
      all-gather      gather both models' logits on every rank, then a one-device loss
  * Measured, where at least 2 CUDA GPUs exist (otherwise skipped with a printed note): fastkd
    against ``megatron_kl`` on the same inputs, checked for equal values first, then timed
    (forward + backward, medians) with each rank's peak allocated memory, for every TP in
    (2, 4, 8) the machine has GPUs for.

Run by ``python -m benchmarks --op tp``; ``python -m benchmarks.tp --gloo-check`` runs the
measured code on 2 CPU processes (gloo) at a tiny size, as a check of the code, not a timing.
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from fastkd.kernels.fused_linear import driver

from . import report

_MIB = 1 << 20


@dataclass(frozen=True)
class TPCase:
    N: int
    Hs: int
    Ht: int
    V: int
    dtype: str  # "bf16" or "fp32"

    @property
    def torch_dtype(self):
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]


COUNTED = TPCase(8192, 4096, 4096, 128256, "bf16")
MEASURED = {"gpu": TPCase(8192, 4096, 4096, 128256, "bf16"), "quick": TPCase(8192, 4096, 4096, 128256, "bf16"),
            "cpu": TPCase(8192, 4096, 4096, 128256, "bf16"), "smoke": TPCase(256, 256, 256, 32003, "bf16")}
GLOO_CHECK = TPCase(64, 32, 48, 1001, "fp32")
REPEATS = 10


# ---------------------------------------------------------------------------------------------
# Counted.
# ---------------------------------------------------------------------------------------------


def _ring_all_reduce(payload, tp):
    # A ring all-reduce sends 2·(TP − 1)/TP of its payload per rank; a ring all-gather of P bytes
    # per rank sends (TP − 1)·P.
    return 2 * (tp - 1) / tp * payload


def _slice(vocab, tp):
    return -(-vocab // tp)  # the largest slice


def counted(case, tp):
    """Bytes per token this rank sends (ring algorithms) and per-rank peak workspace of the loss
    (beyond inputs, parameters and their gradients) for forward KL with the hard CE term off."""
    vocab_r = _slice(case.V, tp)
    element = case.torch_dtype.itemsize
    # fastkd: forward KL all-reduces (2, C) MAX, (2, C) + (2, C) SUM per block: 6 fp32 per token.
    fastkd_payload = 6 * 4
    # megatron_kl below: (2, N) MAX, (2, N) SUM, (1, N) SUM of the loss: 5 fp32 per token.
    megatron_payload = 5 * 4
    # All-gather: this rank's (N, V_r) slices of both logits, to every other rank.
    gather_sent = (tp - 1) * 2 * vocab_r * element
    # grad_hidden: the same (N, Hs) all-reduce in every method (a column-parallel backward).
    grad_hidden = case.Hs * element
    # fastkd's workspace: three (C, V_r) logit blocks in fp32 (fp32_logits, the CUDA default),
    # C = 2^28 // ⌈V / TP⌉ (vocab_size= given: every rank sizes its blocks alike), capped at N; plus the
    # chunk temporaries of the statistics (about a dozen of 2^20 fp32 elements: 48 MiB) and (k, N) statistics.
    rows = min(case.N, driver.BLOCK_ELEMENTS["cuda"] // -(-case.V // tp))
    fastkd_workspace = 3 * rows * vocab_r * 4 + 12 * (1 << 20) * 4 + 16 * case.N * 4
    # megatron_kl: both (N, V_r) logits in the dtype, fp32 copies scaled by 1/T, exp temporaries,
    # the saved fp32 softmaxes p and q, and the gradient of the student logits: at the peak
    # (the forward's Σ p·(log p − log q)) about 2 + 2 + 4·4 bytes per element, then 2 more in the backward.
    megatron_workspace = case.N * vocab_r * (2 * element + 4 * 4)
    gather_workspace = case.N * case.V * (2 * element + 4 * 4)
    return {
        "TP": tp, "V_r": vocab_r,
        "fastkd B/token": _ring_all_reduce(fastkd_payload, tp),
        "megatron B/token": _ring_all_reduce(megatron_payload, tp),
        "all-gather B/token": gather_sent,
        "grad_hidden B/token (all)": _ring_all_reduce(grad_hidden, tp),
        "fastkd workspace MiB": fastkd_workspace / _MIB,
        "megatron workspace MiB": megatron_workspace / _MIB,
        "all-gather workspace MiB": gather_workspace / _MIB,
    }


def counted_table(case=COUNTED, tps=(2, 8)):
    rows = [counted(case, tp) for tp in tps]
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (str(value) if name == "TP" else f"{value:,.0f}" for name, value in row.items())
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The Megatron-style reference: unfused, plain PyTorch.
# ---------------------------------------------------------------------------------------------


class _MegatronVocabParallelKL(torch.autograd.Function):
    """Forward KL(p‖q) per row over a vocabulary split across ``group``, from this rank's
    (N, V_r) logits, as Megatron's vocab-parallel cross-entropy does it: row max and Σexp
    all-reduced, fp32 softmaxes materialised and saved; the backward is local, (q − p)/T."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, group):
        s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
        row_max = torch.stack([s.amax(-1), t.amax(-1)])
        dist.all_reduce(row_max, dist.ReduceOp.MAX, group=group)
        s, t = s - row_max[0, :, None], t - row_max[1, :, None]
        sums = torch.stack([s.exp().sum(-1), t.exp().sum(-1)])
        dist.all_reduce(sums, group=group)
        log_q, log_p = s - sums[0].log()[:, None], t - sums[1].log()[:, None]
        p = log_p.exp()
        loss = (p * (log_p - log_q)).sum(-1)
        dist.all_reduce(loss, group=group)
        ctx.save_for_backward(log_q.exp_(), p)
        ctx.temperature, ctx.dtype = temperature, student_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        q, p = ctx.saved_tensors
        grad = (q - p).mul_(grad_loss[:, None] / ctx.temperature)
        return grad.to(ctx.dtype), None, None, None


def megatron_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature, group):
    """Mean forward KL over the tokens, the logits formed in full per rank ((N, V_r) each); the
    student's hidden-state gradient summed over the group as a column-parallel backward does."""
    student_logits = _CopyToGroup.apply(student_hidden, group) @ student_weight.t()
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.t()
    rows = _MegatronVocabParallelKL.apply(student_logits, teacher_logits, temperature, group)
    return rows.mean()


class _CopyToGroup(torch.autograd.Function):
    """Megatron's copy_to_tensor_model_parallel_region: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


# ---------------------------------------------------------------------------------------------
# Measured (a spawned group per TP).
# ---------------------------------------------------------------------------------------------


def _inputs(case, rank, tp, device):
    """The same hidden states on every rank; this rank's rows of both lm_heads (its own seed:
    both providers read the same tensors, so no rank needs the whole weights)."""
    vocab_r = min(_slice(case.V, tp), case.V - rank * _slice(case.V, tp))

    def randn(generator, *shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device, case.torch_dtype)

    shared, own = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1 + rank)
    student_hidden, teacher_hidden = randn(shared, case.N, case.Hs), randn(shared, case.N, case.Ht)
    student_weight = randn(own, vocab_r, case.Hs, scale=case.Hs ** -0.5)
    teacher_weight = randn(own, vocab_r, case.Ht, scale=2 * case.Ht ** -0.5)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def _worker(rank, tp, store, case, device_type, out_path):
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=tp, timeout=datetime.timedelta(seconds=600))
    group = dist.group.WORLD
    try:
        student_hidden, student_weight, teacher_hidden, teacher_weight = _inputs(case, rank, tp, device)
        providers = {
            "fastkd": lambda h, w: fastkd.fused_linear_kd_loss(h, w, teacher_hidden, teacher_weight, temperature=2.0,
                                                               vocab_size=case.V, process_group=group),
            "megatron": lambda h, w: megatron_kl(h, w, teacher_hidden, teacher_weight, 2.0, group),
        }
        values, results = {}, {}
        for name, loss_fn in providers.items():
            hidden = student_hidden.clone().requires_grad_(True)
            weight = student_weight.clone().requires_grad_(True)
            loss = loss_fn(hidden, weight)
            loss.backward()
            values[name] = (loss.detach().double(), hidden.grad.double(), weight.grad.double())
            del loss, hidden, weight

        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()

        check = [rel(a, b) for a, b in zip(values["fastkd"], values["megatron"])]
        equal = max(check) <= (2e-2 if case.dtype == "bf16" else 1e-4)
        for name, loss_fn in providers.items():
            hidden = student_hidden.clone().requires_grad_(True)
            weight = student_weight.clone().requires_grad_(True)

            def step():
                hidden.grad = weight.grad = None
                loss_fn(hidden, weight).backward()

            step()
            times = []
            if device_type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if device_type == "cuda" else 0
            for _ in range(REPEATS):
                dist.barrier()
                start = time.perf_counter()
                step()
                if device_type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            peak = (torch.cuda.max_memory_allocated() - before) / _MIB if device_type == "cuda" else float("nan")
            results[name] = {"median ms": statistics.median(times), "peak extra MiB": peak}
        if rank == 0:
            torch.save({"check": check, "equal": equal, "results": results}, out_path)
    finally:
        dist.destroy_process_group()


def measure(case, tp, device_type):
    """Spawns ``tp`` processes; returns rank 0's {check, equal, results}."""
    with tempfile.TemporaryDirectory() as folder:
        out_path = os.path.join(folder, "result.pt")
        mp.spawn(_worker, args=(tp, os.path.join(folder, "store"), case, device_type, out_path), nprocs=tp, join=True)
        return torch.load(out_path)


# ---------------------------------------------------------------------------------------------
# The runner's entry.
# ---------------------------------------------------------------------------------------------


def run(suite_name, device, out_dir):
    """Prints and writes the counted table, and the measured one where ≥ 2 CUDA GPUs exist."""
    environment = report.environment(device)
    notes, measurements = [], []
    rows, table = counted_table()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        notes.append(f"measured part skipped: it needs at least 2 CUDA GPUs (found {gpus}); the counted table "
                     f"holds on any machine")
    else:
        case = MEASURED[suite_name]
        for tp in (tp for tp in (2, 4, 8) if tp <= gpus):
            outcome = measure(case, tp, "cuda")
            for name, result in outcome["results"].items():
                measurements.append({"TP": tp, "provider": name, **result,
                                     "check": "ok" if outcome["equal"] else "mismatch",
                                     "rel. err (loss, grad_hidden, grad_weight)":
                                         ", ".join(f"{e:.1e}" for e in outcome["check"])})
        table += "\n\n" + _measured_table(measurements, case)
    results = {"environment": environment, "suite": suite_name, "notes": notes, "counted": rows,
               "measurements": measurements}
    report.write_op(out_dir, "tp", "tp", results,
                    f"Vocab-parallel forward KL at N = {COUNTED.N}, V = {COUNTED.V}, Hs = Ht = {COUNTED.Hs}, "
                    f"{COUNTED.dtype}: bytes each rank sends per token (ring collectives) for the loss's own "
                    f"exchange, the grad_hidden all-reduce every method shares, and the loss's per-rank peak "
                    f"workspace, counted from formulas (benchmarks/tp.py).", table)
    return results


def _measured_table(measurements, case):
    lines = [f"Measured at N = {case.N}, V = {case.V}, Hs = {case.Hs}, Ht = {case.Ht}, {case.dtype}, "
             f"forward + backward, median of {REPEATS}:", "",
             "| TP | provider | median ms | peak extra MiB | check | rel. err (loss, grad_hidden, grad_weight) |",
             "|---|---|---|---|---|---|"]
    for m in measurements:
        lines.append(f"| {m['TP']} | {m['provider']} | {m['median ms']:.2f} | {m['peak extra MiB']:.0f} | "
                     f"{m['check']} | {m['rel. err (loss, grad_hidden, grad_weight)']} |")
    return "\n".join(lines)


def has_mismatch(results):
    return any(m["check"] == "mismatch" for m in results["measurements"])


def _gloo_check():
    """The measured code on 2 CPU processes (gloo) at a tiny size: values equal, nothing timed."""
    outcome = measure(GLOO_CHECK, 2, "cpu")
    print(f"gloo check, TP = 2, {GLOO_CHECK}: rel. err fastkd vs megatron (loss, grad_hidden, grad_weight) = "
          f"{', '.join(f'{e:.1e}' for e in outcome['check'])}: {'equal' if outcome['equal'] else 'MISMATCH'}")
    return 0 if outcome["equal"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tp", description=__doc__.splitlines()[0])
    parser.add_argument("--gloo-check", action="store_true", help="run the measured code on 2 CPU processes")
    args = parser.parse_args()
    if args.gloo_check:
        sys.exit(_gloo_check())
    sys.exit(1 if has_mismatch(run("smoke", torch.device("cpu"), Path(tempfile.mkdtemp()))) else 0)
