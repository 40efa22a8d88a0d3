"""Custom ops of the sampled_kd family: the cross-entropy against sampled teacher ids from full
student logits."""

from ..options import SampledOptions
from .teacher_table import define_teacher_table_rows

_rows = define_teacher_table_rows("sampled_kd_rows", "sampled_kd", SampledOptions, "sampled_ids",
                                  "sample_weights", "sample_count")


def sampled_kd_rows(student, sampled_ids, sample_weights, labels, options):
    """Per-row sampled cross-entropy of (N, V) student logits against (N, K) sampled ids: (N,)."""
    return _rows(student, sampled_ids, sample_weights, labels, options)
