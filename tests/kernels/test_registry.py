"""The capability registry: one choice of backend per call, clear errors, a report per family,
every usable row exercised by the suite; and the torch backend's chunking and bounded memory."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fastkd
from conftest import DEVICE, EXERCISED
from fastkd.kernels import registry
from fastkd.kernels.logits import torch as torch_logits
from reference import kd_loss as reference_kd_loss
from reference import rel_err

FP32 = (torch.float32, torch.float32)


def test_available_backends_reports_every_family_and_backend_with_a_reason():
    report = fastkd.available_backends()
    assert set(report) == set(registry.FAMILIES)
    for family, statuses in report.items():
        assert set(statuses) == set(registry.BACKENDS)
        assert statuses["torch"].available and statuses["torch"].devices == ("*",), family
        for status in statuses.values():
            assert isinstance(status.reason, str) and status.reason
            assert status.available == bool(status.devices)


def test_auto_picks_the_highest_priority_row_that_runs_here():
    native_here = registry._runs("native", DEVICE.type)[0]
    expected = "triton" if DEVICE.type == "cuda" else ("native" if native_here else "torch")
    assert registry.select("kd_rows", "auto", DEVICE, FP32) == expected
    # float64 only on the torch backend; Sinkhorn's C++ forward is opt-in (priority 0).
    assert registry.select("kd_rows", "auto", DEVICE, (torch.float64, torch.float32)) == "torch"
    assert registry.select("sinkhorn", "auto", DEVICE, FP32) in ("triton", "torch")


def test_an_explicit_backend_that_cannot_serve_says_what_would():
    with pytest.raises(ValueError) as info:
        registry.select("kd_rows", "triton", DEVICE, (torch.float64, torch.float64))
    assert "float64" in str(info.value) and "'torch'" in str(info.value)
    with pytest.raises(ValueError) as info:
        registry.select("kd_rows", "native", torch.device("meta"), FP32)
    assert "'meta'" in str(info.value) and "torch" in str(info.value)
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton', 'native'"):
        registry.select("kd_rows", "cpu", DEVICE, FP32)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_the_torch_backend_serves_every_device_type():
    # mps, xpu, privateuse1, …: whatever PyTorch runs on; "meta" stands in for them here.
    for family in registry.FAMILIES:
        assert registry.select(family, "auto", torch.device("meta"), FP32) == "torch"


def test_every_usable_row_is_exercised_by_the_suite(request):
    # Conditional rows included: their tests (each_backend(..., conditional=True)) exercise them
    # inside their domain.
    exercised, files = request.config.stash[EXERCISED]
    if not {"test_logits.py", "test_functional.py", "test_sinkhorn.py", "test_sinkhorn_gemm.py",
            "test_sparse.py"} <= files:
        pytest.skip("only part of the suite was collected")
    wanted = {(family, backend) for family in registry.FAMILIES
              for backend in registry.usable_backends(family, DEVICE.type)}
    assert any(row.condition for row in registry.rows()), "no conditional row left: simplify this test"
    assert wanted <= exercised, sorted(wanted - exercised)


def test_conditional_rows_name_a_condition_that_answers_with_a_verdict():
    """Every conditional row points at a function of its module; available_backends marks the
    backend conditional and shows the row's note, which states the condition."""
    report = fastkd.available_backends()
    for row in registry.rows():
        if not row.condition:
            continue
        assert callable(getattr(__import__(row.module, fromlist=[row.condition]), row.condition))
        assert row.note
        status = report[row.family][row.backend]
        assert status.conditional and row.note in status.reason
        # Without a description of the call the row serves nothing: auto passes it over.
        verdict = registry.verdict(row, None, auto=True)
        assert not verdict.serves and not verdict.auto and verdict.reason
    assert not report["sinkhorn"]["torch"].conditional


def test_no_backend_module_imports_another_backend():
    # Kernel modules import the registry, the layout and their family's contract only.
    script = textwrap.dedent("""
        import ast, pathlib
        root = pathlib.Path("fastkd/kernels")
        for path in root.rglob("*.py"):
            name = path.stem
            if name in ("registry", "layout", "contract", "__init__") or path.parent == root:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    for alias in node.names:
                        target = (node.module or alias.name).split(".")[-1]
                        backend = target.split("_")[0]
                        own = name.split("_")[0]
                        if backend in ("torch", "triton", "native", "gemm") and backend != own:
                            print(f"{path}: imports {node.module or alias.name}")
    """)
    root = __import__("pathlib").Path(fastkd.__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout == "", out.stdout


def test_chunk_boundaries_do_not_change_results(monkeypatch):
    student = torch.randn(37, 101, device=DEVICE, requires_grad=True)
    teacher = torch.randn(37, 101, device=DEVICE)
    labels = torch.randint(-1, 5, (37,), device=DEVICE)
    monkeypatch.setattr(torch_logits, "CHUNK_ELEMENTS", 101 * 4 + 7)  # 4 rows per chunk, ragged tail
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
    chunk_mib = torch_logits.CHUNK_ELEMENTS * 4 / 2**20
    # JSD keeps about twenty chunk-sized temporaries alive at its peak.
    assert growth_mib < min(32 * chunk_mib, one_full_tensor_mib / 2), growth_mib
