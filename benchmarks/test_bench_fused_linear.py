"""pytest-benchmark suite for the fused linear KD loss of issue 3 (benchmarks/fused_linear.py):
fastkd against eager PyTorch, torch.compile and Liger-Kernel (where installed), with the four
GEMMs alone as the floor.

    pytest benchmarks/test_bench_fused_linear.py --benchmark-only
    FASTKD_BENCH_SUITE=smoke pytest benchmarks/test_bench_fused_linear.py --benchmark-only

Every provider is checked against a float64 eager reference first.
"""

import os

import pytest
import torch

from benchmarks import config, fused_linear
from benchmarks.harness import wall_clock_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITE = os.environ.get("FASTKD_BENCH_SUITE") or config.default_suite_name(DEVICE)
PROVIDERS, _ = fused_linear.select(DEVICE, SUITE)


def _case_id(case):
    return f"N{case.N}-Hs{case.Hs}-Ht{case.Ht}-V{case.V}-{case.dtype}"


@pytest.fixture(scope="module", params=fused_linear.SUITES[SUITE], ids=_case_id)
def case_data(request):
    case = request.param
    inputs = fused_linear.make_inputs(case, DEVICE)
    return case, inputs, fused_linear.reference(inputs)


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_fused_linear(benchmark, case_data, provider):
    case, inputs, reference = case_data
    step = provider.make(inputs)
    if provider.checked:
        status, detail = fused_linear._check(step(), reference, case)
        assert status == "ok", f"{provider.name} disagrees with the float64 reference: {detail}"

    timed = wall_clock_step(step, DEVICE)

    benchmark.group = f"fused_linear {_case_id(case)} fwd+bwd"
    benchmark.extra_info.update(provider=provider.name)
    benchmark(timed)
