"""Shared test set-up: interpreter mode for Triton on machines without a GPU, seeds, devices,
the backends under test and the tolerance table."""

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton`: the kernels then run on the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastkd  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Backends whose kernels run on DEVICE here.
BACKENDS = [name for name, status in fastkd.available_backends().items()
            if status.available and DEVICE.type in status.devices]

# Relative-norm tolerances ‖out − ref‖ / ‖ref‖ against float64 references, by the dtype the
# result is stored in: losses are accumulated in fp32 whatever the inputs; gradients are
# rounded to the student's dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 5e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
