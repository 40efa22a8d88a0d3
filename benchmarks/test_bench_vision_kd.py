"""pytest-benchmark suite for the vision logit-KD cases of issue 17 (benchmarks/vision_kd.py):
decoupled KD and standardised KD against the eager code of mdistiller and of the
logit-standardisation paper, forward+backward.

    pytest benchmarks/test_bench_vision_kd.py --benchmark-only
    FASTKD_BENCH_SUITE=smoke pytest benchmarks/test_bench_vision_kd.py --benchmark-only

Every provider's loss and gradient are checked against the eager code's first.
"""

import os

import pytest
import torch

from benchmarks import config, vision_kd
from benchmarks.harness import wall_clock_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITE = os.environ.get("FASTKD_BENCH_SUITE") or config.default_suite_name(DEVICE)
CASES = vision_kd.SUITES[SUITE]
PROVIDERS = ("fastkd-native", "fastkd-triton", "fastkd-torch", "eager")


def _case_id(case):
    return f"{case.loss}-B{case.B}-C{case.C}"


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def case_data(request):
    case = request.param
    inputs = vision_kd.make_inputs(case, DEVICE)
    return case, inputs, vision_kd._step(vision_kd._eager(case), *inputs)()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_vision_kd(benchmark, case_data, provider):
    case, inputs, (ref_loss, ref_grad) = case_data
    chosen, _ = vision_kd.providers(case, DEVICE)
    if provider not in chosen:
        pytest.skip(f"{provider} does not run {case.loss} here")
    step = vision_kd._step(chosen[provider], *inputs)
    loss, grad = step()
    assert vision_kd._rel_err(loss, ref_loss) < 1e-4 and vision_kd._rel_err(grad, ref_grad) < 1e-4

    benchmark.group = f"vision_kd {_case_id(case)} fwd+bwd"
    benchmark.extra_info.update(provider=provider, mode="fwd+bwd")
    benchmark(wall_clock_step(step, DEVICE))
