"""pytest-benchmark suite for the Sinkhorn cases of issue 4 (benchmarks/sinkhorn.py): Wasserstein KD
with a shared class cost against the per-sample-copy reference, and many small problems against
POT's batched solver.

    pytest benchmarks/test_bench_sinkhorn.py --benchmark-only
    FASTKD_BENCH_SUITE=smoke pytest benchmarks/test_bench_sinkhorn.py --benchmark-only

Every provider is checked against fastkd first.
"""

import os

import pytest
import torch

from benchmarks import config, sinkhorn
from benchmarks.harness import wall_clock_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SUITE = os.environ.get("FASTKD_BENCH_SUITE") or config.default_suite_name(DEVICE)
CASES = sinkhorn.SUITES[SUITE]


def _case_id(case):
    return f"{case.kind}-B{case.B}-{case.n}x{case.m}"


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def case_data(request):
    case = request.param
    inputs = sinkhorn.make_inputs(case, DEVICE)
    step, summary = sinkhorn._fastkd("auto")(case, inputs)
    return case, inputs, summary(step())


@pytest.mark.parametrize("provider", ["fastkd", "peer"])
def test_sinkhorn(benchmark, case_data, provider):
    case, inputs, reference = case_data
    providers, _ = sinkhorn.select(case, DEVICE)
    chosen = [p for p in providers if p.name.startswith("fastkd-") == (provider == "fastkd")]
    if not chosen:
        pytest.skip(f"no {provider} provider runs here")
    step, summary = chosen[0].make(case, inputs)
    value = summary(step())
    assert abs(value - reference) <= 1e-3 * abs(reference), f"{chosen[0].name} disagrees with fastkd"

    timed = wall_clock_step(step, DEVICE)

    benchmark.group = f"sinkhorn {_case_id(case)} {case.mode}"
    benchmark.extra_info.update(provider=chosen[0].name, mode=case.mode)
    benchmark(timed)
