"""Shared test set-up: interpreter mode for Triton on machines without a GPU, seeds, the device,
the backends under test (from the capability registry) and the one tolerance table."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton`: the kernels then run on the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastkd.kernels import registry  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends_for(family, conditional=False):
    """The backends that run ``family`` on DEVICE here, per the registry (auto's choice first):
    those that serve every call, or (``conditional=True``) those whose rows serve only the calls
    their condition accepts (e.g. the Sinkhorn gemm backend: a shared cost inside its domain)."""
    return registry.usable_backends(family, DEVICE.type, conditional=conditional)


def each_backend(*families, conditional=False):
    """Parametrizes a test's ``backend`` over every backend that runs all of ``families`` here, and
    records which (family, backend) rows the suite exercises (tests/kernels/test_registry.py).
    Conditional rows are exercised by tests written for their domain: ``conditional=True``."""
    names = [name for name in backends_for(families[0], conditional)
             if all(name in backends_for(f, conditional) for f in families[1:])]
    marks = [pytest.mark.family(family) for family in families]
    return pytest.mark.parametrize("backend", [pytest.param(name, marks=marks) for name in names])


# Backends of the kd_rows family: the default matrix of the logits tests.
BACKENDS = backends_for("kd_rows")

# Relative-norm tolerances ‖out − ref‖ / ‖ref‖ against float64 references, by the dtype the
# result is stored in: losses are accumulated in fp32 whatever the inputs; gradients are
# rounded to the student's dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 5e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
# Sinkhorn against POT, per backend: float64 runs only on the torch backend; Triton and the C++
# kernels compute in fp32 and are held to fp32 accuracy of an iterative solver.
# The gemm backend in fp32 (it also runs float64, where it is held to the torch backend's 1e-9).
SINKHORN_TOLERANCE = {"torch": 1e-9, "triton": 2e-5, "native": 2e-5, "gemm": 2e-5}
# The OT losses add a softmax and a reduction in front of the solver.
OT_LOSS_TOLERANCE = {"torch": 1e-9, "triton": 3e-5, "native": 3e-5, "gemm": 3e-5}
# The fused linear losses form logits by matmul in the input dtype, then accumulate in fp32.
FUSED_TOLERANCE = 2e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


EXERCISED = pytest.StashKey()


def pytest_configure(config):
    config.addinivalue_line("markers", "family(name): the registry family a backend-parametrized test exercises")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    exercised = set()
    for item in items:
        if "requires_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        for mark in item.iter_markers("family"):
            if backend is not None:
                exercised.add((mark.args[0], backend))
    config.stash[EXERCISED] = (exercised, {item.path.name for item in items})
