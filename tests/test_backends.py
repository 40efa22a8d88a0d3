"""Backend discovery and selection, the torch backend's chunking, and its bounded memory."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fastkd
from conftest import DEVICE
from fastkd.backends import resolve_backend, torch_ref
from reference import kd_loss as reference_kd_loss
from reference import rel_err


def test_available_backends_reports_every_backend_with_a_reason():
    status = fastkd.available_backends()
    assert set(status) == {"torch", "triton", "cpu", "cuda"}
    assert status["torch"].available
    for entry in status.values():
        assert isinstance(entry.reason, str) and entry.reason
        assert entry.available == bool(entry.devices)


def test_auto_picks_a_backend_that_runs_here():
    name = resolve_backend("auto", DEVICE, (torch.float32, torch.float32))
    cpu_kernels = fastkd.available_backends()["cpu"].available
    assert name == ("triton" if DEVICE.type == "cuda" else "cpu" if cpu_kernels else "torch")
    assert resolve_backend("auto", DEVICE, (torch.float64, torch.float32)) == "torch"


def test_chunk_boundaries_do_not_change_results(monkeypatch):
    student = torch.randn(37, 101, device=DEVICE, requires_grad=True)
    teacher = torch.randn(37, 101, device=DEVICE)
    labels = torch.randint(-1, 5, (37,), device=DEVICE)
    monkeypatch.setattr(torch_ref, "CHUNK_ELEMENTS", 101 * 4 + 7)  # 4 rows per chunk, ragged tail
    loss = fastkd.kd_loss(student, teacher, divergence="tvd", labels=labels, ignore_index=-1, backend="torch")
    (grad,) = torch.autograd.grad(loss, student)
    ref_student = student.detach().double().requires_grad_(True)
    ref = reference_kd_loss(ref_student, teacher, divergence="tvd", labels=labels, ignore_index=-1)
    (ref_grad,) = torch.autograd.grad(ref, ref_student)
    assert rel_err(loss, ref) < 5e-6 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from getrusage")
def test_torch_backend_forward_memory_is_bounded():
    # In a fresh process: peak RSS growth during the forward at N=2048, V=32000 fp32 must stay far
    # below one (N, V) fp32 tensor (250 MiB): the backend works in chunks of CHUNK_ELEMENTS.
    script = textwrap.dedent("""
        import resource, torch, fastkd
        torch.set_num_threads(1)
        s = torch.randn(2048, 32000); t = torch.randn(2048, 32000)
        fastkd.kd_loss(s[:2], t[:2], divergence="jsd", backend="torch")  # warm-up allocations
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fastkd.kd_loss(s, t, divergence="jsd", backend="torch")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    one_full_tensor_mib = 2048 * 32000 * 4 / 2**20
    chunk_mib = torch_ref.CHUNK_ELEMENTS * 4 / 2**20
    # JSD keeps about twenty chunk-sized temporaries alive at its peak.
    assert growth_mib < min(32 * chunk_mib, one_full_tensor_mib / 2), growth_mib
