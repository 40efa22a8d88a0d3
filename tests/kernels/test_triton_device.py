"""Triton launchers run on their tensors' GPU: each enters ``torch.cuda.device(<the tensors' device>)``
before it launches (a launch goes to the current device, which need not be the tensors'). Checked
without a GPU: ``torch.cuda.device`` is replaced by a recorder, and a tensor reports cuda:1."""

import inspect

import pytest
import torch

from fastkd.kernels import registry

# (family, launcher) of every Triton launcher the registry's rows reach.
LAUNCHERS = [("kd_rows", "kd_rows_forward"), ("kd_rows", "kd_rows_backward"),
             ("kl_div", "kl_div_rows_forward"), ("kl_div", "kl_div_rows_backward"),
             ("ce", "ce_rows_forward"), ("ce", "ce_rows_backward"),
             ("sinkhorn", "sinkhorn_forward"), ("sinkhorn_backward", "sinkhorn_backward")]


class _OnSecondGpu(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (all a launcher's guard looks at)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


class _Entered(Exception):
    pass


class _RecordingDevice:
    """Stands in for torch.cuda.device: records the device and stops the launcher on entry."""

    entered = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _RecordingDevice.entered.append(self.device)
        raise _Entered

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("family, name", LAUNCHERS)
def test_each_triton_launcher_enters_its_tensors_device(monkeypatch, family, name):
    launcher = getattr(registry.implementation(family, "triton", "cuda"), name)
    monkeypatch.setattr(torch.cuda, "device", _RecordingDevice)
    _RecordingDevice.entered = []
    tensor = torch.zeros(2, 3).as_subclass(_OnSecondGpu)
    others = [None] * (len(inspect.signature(launcher).parameters) - 1)
    with pytest.raises(_Entered):
        launcher(tensor, *others)
    assert _RecordingDevice.entered == [torch.device("cuda", 1)]


def test_cpu_tensors_launch_without_a_device_guard(monkeypatch):
    # The interpreter's CPU tensors: torch.cuda.device would reject them; it is never entered.
    if registry.usable_backends("kd_rows", "cpu").count("triton") == 0:
        pytest.skip("Triton does not run on this machine's CPU (TRITON_INTERPRET is not set)")
    from fastkd.divergences import make_spec

    monkeypatch.setattr(torch.cuda, "device", _RecordingDevice)
    _RecordingDevice.entered = []
    launchers = registry.implementation("kd_rows", "triton", "cpu")
    student, teacher = torch.randn(2, 16), torch.randn(2, 16)
    loss, _ = launchers.kd_rows_forward(student, teacher, None, make_spec("forward_kl"), -100)
    assert torch.isfinite(loss).all() and _RecordingDevice.entered == []
