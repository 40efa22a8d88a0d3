"""Launchers of the compiled sparse_kd tail-mode kernels of fastkd._C (csrc/sparse/cpu.cpp): the
``native`` backend of the sparse_kd family on the CPU. Same signatures and semantics as
sparse/triton.py's tail_stats and tail_grad, so the block logic around them (sparse/blocks.py
tail_block: the (R, k) bucket math in torch ops) is shared; the renormalize mode reads k logits per
row and is torch's gather and scatter (blocks.renormalize_block), as on every backend.

Forward: one read of the logits; backward: one read and one write (plus the stats pass again in
the op's backward, which gets no saved statistics). No CUDA kernel: the cuda row of the registry
keeps the torch implementation.
"""

import torch

from ..native_ext import extension, launch, rows_view
from . import blocks, contract

support_loss = blocks.support_loss


def _args(student, sorted_ids, inv_temperature):
    n_rows, n_cols = student.shape
    return extension().SparseTailArgs(n_rows=n_rows, n_cols=n_cols, top_k=sorted_ids.shape[1],
                                      student=rows_view(student), ids=sorted_ids.data_ptr(),
                                      inv_temperature=float(inv_temperature))


def _check(student, sorted_ids):
    if student.dim() != 2 or student.device.type != "cpu":
        raise ValueError(f"student: the native sparse kernels take 2-D CPU logits; got shape {tuple(student.shape)} "
                         f"on {student.device}")
    if sorted_ids.dtype != torch.int32 or not sorted_ids.is_contiguous() or sorted_ids.shape[0] != student.shape[0]:
        raise ValueError(f"sorted_ids must be contiguous int32 ({student.shape[0]}, k); got {sorted_ids.dtype} "
                         f"{tuple(sorted_ids.shape)}")


def tail_stats(student, sorted_ids, active, inv_temperature):
    """As sparse/triton.py tail_stats: (R, 4) fp32 statistics (contract.STATS_COLUMNS)."""
    _check(student, sorted_ids)
    n_rows = student.shape[0]
    stats = torch.empty(n_rows, contract.N_STATS, dtype=torch.float32)
    if n_rows and sorted_ids.shape[1]:
        active = active.to(torch.int8).contiguous()
        launch("sparse_tail_stats", student.device, _args(student, sorted_ids, inv_temperature),
               active=active.data_ptr(), stats=stats.data_ptr())
    return stats


def tail_grad(student, sorted_ids, sorted_grads, stats, coefficients, mode, inv_temperature):
    """As sparse/triton.py tail_grad: the (R, V) gradient in the student's dtype."""
    _check(student, sorted_ids)
    n_rows, n_cols = student.shape
    out = torch.empty(n_rows, n_cols, dtype=student.dtype)
    if n_rows and sorted_ids.shape[1]:
        sorted_grads, stats, coefficients = (t.to(torch.float32).contiguous() for t in (sorted_grads, stats,
                                                                                       coefficients))
        mode = mode.to(torch.int8).contiguous()
        launch("sparse_tail_grad", student.device, _args(student, sorted_ids, inv_temperature),
               support_grads=sorted_grads.data_ptr(), stats=stats.data_ptr(), coefficients=coefficients.data_ptr(),
               mode=mode.data_ptr(), grad=out.data_ptr())
    return out


def block_loss(student_logits, indices, logprobs, labels, spec, missing_mass, ignore_index, scale=None):
    """As sparse/torch.py's block_loss, the tail mode's V passes in fastkd._C."""
    if missing_mass == "renormalize":
        return blocks.renormalize_block(student_logits, indices, logprobs, labels, spec, ignore_index, scale)
    return blocks.tail_block(student_logits, indices, logprobs, labels, spec, ignore_index, scale, tail_stats,
                             tail_grad)


def rows_forward(student, indices, logprobs, labels, spec, missing_mass, ignore_index):
    """student: (N, V); indices, logprobs: (N, k). Per-row losses (N,); no (N, V) temporary."""
    return block_loss(student, indices, logprobs, labels, spec, missing_mass, ignore_index)[0]


def rows_backward(grad_rows, student, indices, logprobs, labels, spec, missing_mass, ignore_index):
    """∂(Σ grad_rows·loss)/∂student: (N, V) in the student's dtype."""
    return block_loss(student, indices, logprobs, labels, spec, missing_mass, ignore_index, grad_rows)[1]
