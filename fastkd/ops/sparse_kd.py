"""Custom ops of the sparse_kd family: the divergence against a top-k teacher from full student
logits."""

from ..options import SparseOptions
from .teacher_table import define_teacher_table_rows

_rows = define_teacher_table_rows("sparse_kd_rows", "sparse_kd", SparseOptions, "teacher_indices",
                                  "teacher_logprobs", "missing_mass")


def sparse_kd_rows(student, teacher_indices, teacher_logprobs, labels, options):
    """Per-row divergence of (N, V) student logits against a top-k teacher (N, k): (N,)."""
    return _rows(student, teacher_indices, teacher_logprobs, labels, options)
