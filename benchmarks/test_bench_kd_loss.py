"""pytest-benchmark suite: kd_loss forward and forward+backward, per divergence and provider.

A plain ``pytest`` does not collect this file (the repository's testpaths is ``tests``); run

    pytest benchmarks/ --benchmark-only
    FASTKD_BENCH_SUITE=smoke pytest benchmarks/ --benchmark-only     # tiny sizes

Sizes come from ``benchmarks.config.SUITES``: FASTKD_BENCH_SUITE = gpu | cpu | smoke, by default
"gpu" on a CUDA machine and "cpu" elsewhere. Every provider is checked against a float64 eager
reference first.
"""

import os

import pytest
import torch

from benchmarks import checks, config, harness, providers

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITE = config.SUITES[os.environ.get("FASTKD_BENCH_SUITE") or config.default_suite_name(DEVICE)]
# torch.compile only on CUDA: on the 2-core CPU its compile time would dominate the suite.
PROVIDERS, _ = providers.select(DEVICE, with_compile=DEVICE.type == "cuda")


def _case_id(case):
    return f"{case.divergence}-{case.dtype}-{case.N}x{case.V}"


@pytest.fixture(scope="module", params=SUITE.cases, ids=_case_id)
def case_data(request):
    """One case's inputs and float64 reference, built once for all its providers and modes
    (module scope: pytest orders the tests so only one case's tensors are alive at a time)."""
    case = request.param
    student, teacher = providers.make_inputs(case, DEVICE)
    ref_loss, ref_grad = checks.reference(case, student, teacher)
    return case, student, teacher, ref_loss, ref_grad


@pytest.mark.parametrize("mode", config.MODES)
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_kd_loss(benchmark, case_data, provider, mode):
    case, student, teacher, ref_loss, ref_grad = case_data
    loss_fn = provider.make(case)
    result = checks.check(loss_fn, student, teacher, ref_loss, ref_grad)
    assert result.status == "ok", f"{provider.name} disagrees with the float64 reference: {result.detail}"

    timed = harness.wall_clock_step(harness.make_step(loss_fn, student, teacher, mode), DEVICE)

    benchmark.group = f"{config.OP} {case.divergence} {case.dtype} {case.N}x{case.V} {mode}"
    benchmark.extra_info.update(provider=provider.name, mode=mode, divergence=case.divergence)
    benchmark(timed)
