"""Bad input gets a clear error naming the argument, raised before any kernel runs."""

import math

import pytest
import torch

import fastkd
from conftest import DEVICE


def _pair(n_rows=3, vocab=11):
    return torch.randn(n_rows, vocab, device=DEVICE), torch.randn(n_rows, vocab, device=DEVICE)


CASES = [
    # (keyword overrides or replaced tensors, exception type, words the message must contain)
    (dict(student_logits=[[1.0, 2.0]]), TypeError, ["student_logits", "torch.Tensor"]),
    (dict(student_logits=torch.ones(3, 11, dtype=torch.long)), TypeError, ["student_logits", "floating-point"]),
    (dict(teacher_logits=torch.ones(3, 11, dtype=torch.complex64)), TypeError, ["teacher_logits", "floating-point"]),
    (dict(teacher_logits=torch.randn(3, 12)), ValueError, ["vocabulary sizes differ", "V=11", "V=12"]),
    (dict(teacher_logits=torch.randn(4, 11)), ValueError, ["teacher_logits shape", "student_logits shape"]),
    (dict(student_logits=torch.randn(3, 0), teacher_logits=torch.randn(3, 0)), ValueError, ["student_logits", "V = 0"]),
    (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, ["student_logits", "0-d"]),
    (dict(labels=torch.zeros(4, dtype=torch.long)), ValueError, ["labels", "leading shape"]),
    (dict(labels=torch.zeros(3)), TypeError, ["labels", "integer"]),
    (dict(labels=torch.zeros(3, dtype=torch.bool)), TypeError, ["labels", "integer"]),
    (dict(labels=[0, 1, 2]), TypeError, ["labels", "torch.Tensor"]),
    (dict(temperature=0.0), ValueError, ["temperature", "> 0"]),
    (dict(temperature=-1.0), ValueError, ["temperature", "> 0"]),
    (dict(temperature=math.inf), ValueError, ["temperature", "finite"]),
    (dict(temperature=math.nan), ValueError, ["temperature"]),
    (dict(temperature="2"), TypeError, ["temperature", "number"]),
    (dict(divergence="jsd", beta=1.5), ValueError, ["beta", "[0, 1]"]),
    (dict(divergence="jsd", beta=-0.1), ValueError, ["beta", "[0, 1]"]),
    (dict(divergence="skew_forward_kl", skew=0.0), ValueError, ["skew", "(0, 1)"]),
    (dict(divergence="skew_reverse_kl", skew=1.0), ValueError, ["skew", "(0, 1)"]),
    (dict(divergence="kl"), ValueError, ["divergence", "forward_kl", "reverse_kl", "jsd", "tvd"]),
    (dict(reduction="batchmean"), ValueError, ["reduction", "'mean'", "'sum'", "'none'"]),
    (dict(reduction="sum", normalizer=4), ValueError, ["normalizer", "reduction='sum'"]),
    (dict(normalizer=0), ValueError, ["normalizer", "> 0"]),
    (dict(normalizer=torch.ones(2)), ValueError, ["normalizer", "one value"]),
    (dict(normalizer="4"), TypeError, ["normalizer"]),
    (dict(ignore_index=1.5), TypeError, ["ignore_index", "int"]),
    (dict(temperature_squared=1), TypeError, ["temperature_squared", "bool"]),
    (dict(backend="fast"), ValueError, ["backend", "'auto'", "'torch'", "'triton'"]),
    (dict(student_logits=torch.randn(3, 11, dtype=torch.float64), backend="triton"), ValueError,
     ["backend='triton'", "float64"]),
]


@pytest.mark.parametrize("overrides,error,words", CASES)
def test_bad_input_names_the_argument(overrides, error, words):
    student, teacher = _pair()
    kwargs = dict(student_logits=student, teacher_logits=teacher)
    for key in ("student_logits", "teacher_logits"):
        if key in overrides:
            value = overrides[key]
            kwargs[key] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    options = {k: v for k, v in overrides.items() if k not in kwargs}
    if isinstance(options.get("labels"), torch.Tensor):
        options["labels"] = options["labels"].to(DEVICE)
    with pytest.raises(error) as info:
        fastkd.kd_loss(kwargs["student_logits"], kwargs["teacher_logits"], **options)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_different_devices_are_rejected():
    student = torch.randn(2, 5, device="meta")
    teacher = torch.randn(2, 5)
    with pytest.raises(ValueError, match="student_logits is on meta but teacher_logits is on cpu"):
        fastkd.kd_loss(student, teacher)


def test_labels_on_another_device_are_rejected():
    student, teacher = torch.randn(2, 5, device="meta"), torch.randn(2, 5, device="meta")
    with pytest.raises(ValueError, match="labels are on cpu"):
        fastkd.kd_loss(student, teacher, labels=torch.zeros(2, dtype=torch.long))


def test_unavailable_backend_says_why_and_which_are_usable():
    statuses = fastkd.available_backends()["kd_rows"]
    # Backends with kd_rows kernels that do not run here (not those without kd_rows kernels at all).
    has_rows = {row.backend for row in fastkd.kernels.registry.rows("kd_rows")}
    unavailable = [status for status in statuses.values() if status.name in has_rows
                   and DEVICE.type not in status.devices and "*" not in status.devices]
    if not unavailable:
        pytest.skip("every backend is available on this machine")
    with pytest.raises(ValueError) as info:
        fastkd.kd_loss(*_pair(), backend=unavailable[0].name)
    message = str(info.value)
    assert f"backend={unavailable[0].name!r}" in message and "'torch'" in message
    reason = dict(part.split(": ", 1) for part in unavailable[0].reason.split(" (note")[0].split("; "))
    assert reason[DEVICE.type] in message


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="divergence"):
        fastkd.KDLoss("kl")
    with pytest.raises(ValueError, match="reduction"):
        fastkd.KDLoss(reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        fastkd.KDLoss(temperature=0)
