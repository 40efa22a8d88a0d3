"""The compiled extension fastkd._C (CPU part), against float64 formulas."""

import math

import pytest
import torch

import reference
from fastkd.kernels import native_ext as native
from reference import rel_err

_C = pytest.importorskip("fastkd._C", reason="the compiled extension is not built (FASTKD_BUILD_EXT=0?)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n_rows,vocab", [(1, 1), (7, 1000), (3, 32003)])
def test_row_logsumexp_matches_float64(dtype, n_rows, vocab):
    x = (torch.randn(n_rows, vocab, dtype=torch.float64) * 4).to(dtype)
    out = native.row_logsumexp(x, temperature=1.5)
    assert rel_err(out, torch.logsumexp(x.double() / 1.5, dim=-1)) < 2e-6


def test_row_logsumexp_strided_masked_and_extreme():
    base = torch.randn(6, 500) * 1e4
    base[:, ::3] = -math.inf
    x = base[::2, ::2]  # strided rows and columns
    assert rel_err(native.row_logsumexp(x), torch.logsumexp(x.double(), dim=-1)) < 1e-6
    assert native.row_logsumexp(torch.full((2, 5), -math.inf)).eq(-math.inf).all()


def test_row_logsumexp_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D CPU tensor"):
        native.row_logsumexp(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="float32"):
        native.row_logsumexp(torch.ones(2, 3, dtype=torch.long))


def test_extension_is_torch_abi_free():
    assert _C.with_cuda in (True, False)
    with open(_C.__file__, "rb") as handle:
        assert b"libtorch" not in handle.read()


# ---------------------------------------------------------------------------------------------
# The kd_rows / kl_div_rows kernels (csrc/cpu/kd_rows.cpp). The kd_loss matrix in
# test_functional.py, test_properties.py and kernels/test_logits.py runs them as the "native"
# backend; the tests below cover what that matrix cannot see.
# ---------------------------------------------------------------------------------------------

from fastkd import available_backends  # noqa: E402
from fastkd.kernels.logits import native as native_kd  # noqa: E402
from fastkd.divergences import make_spec  # noqa: E402

_HAS_KD = hasattr(_C, "kd_rows_forward_cpu")
needs_kd = pytest.mark.skipif(not _HAS_KD, reason="fastkd._C predates the kd_rows kernels")


@needs_kd
def test_cpu_backend_is_available_and_under_test():
    from conftest import BACKENDS, DEVICE

    status = available_backends()["kd_rows"]["native"]
    assert status.available and "cpu" in status.devices, status
    assert DEVICE.type != "cpu" or "native" in BACKENDS


def _cpu_tensor_view(x):
    return native.rows_view(x)


@needs_kd
@pytest.mark.skipif(torch.cuda.is_available(), reason="the bogus host addresses below must not reach a GPU")
def test_cuda_entry_point_raises_a_clear_error_without_a_gpu():
    # A build without CUDA says so; a CUDA build on a machine without a GPU (or driver) raises the
    # CUDA runtime's own error name and message from the first CUDA call.
    x = torch.randn(2, 8)
    loss, stats = torch.empty(2), torch.empty(2, 5)
    args = (2, 8, _cpu_tensor_view(x), _cpu_tensor_view(x), 0, -100, (0, 1.0, 0.0, -math.inf, 0.0),
            loss.data_ptr(), stats.data_ptr(), 0, 0)
    expected = "CUDA error in cudaGetDevice: cuda" if _C.with_cuda else "built without CUDA"
    with pytest.raises(RuntimeError, match=expected):
        _C.kd_rows_forward_cuda(*args)


def _sinkhorn_entry_args(cost_dtype_code=0, max_iter=5):
    cost, a, b = torch.rand(4, 3), torch.full((1, 4), 0.25), torch.full((1, 3), 1 / 3)
    outputs = [torch.empty(1), torch.empty(1), torch.empty(1, 4), torch.empty(1, 3),
               torch.empty(1, dtype=torch.int32), torch.empty(1)]
    keep = (cost, a, b, outputs)
    return keep, (1, 4, 3, (cost.data_ptr(), cost_dtype_code, 0, 3, 1), a.data_ptr(), b.data_ptr(), 0.1, max_iter,
                  1e-6, False, False, tuple(x.data_ptr() for x in outputs) + (0, 0, 0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host addresses below must not reach a GPU")
def test_sinkhorn_cuda_entry_point_raises_a_clear_error_without_a_gpu():
    _keep, args = _sinkhorn_entry_args()
    expected = "CUDA error in cudaGetDevice: cuda" if _C.with_cuda else "built without CUDA"
    with pytest.raises(RuntimeError, match=expected):
        _C.sinkhorn_forward_cuda(*args, 1, 0, 0)


def test_sinkhorn_entry_points_check_their_arguments():
    _keep, args = _sinkhorn_entry_args(cost_dtype_code=3)  # float64: not a kernel dtype
    with pytest.raises(ValueError, match="cost must be float32, float16 or bfloat16"):
        _C.sinkhorn_forward_cpu(*args, 1)
    _keep, args = _sinkhorn_entry_args(max_iter=0)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        _C.sinkhorn_forward_cpu(*args, 1)
    if _C.with_cuda:  # checked before any CUDA call, so this runs without a GPU too
        with pytest.raises(ValueError, match="max_iter must be >= 1"):
            _C.sinkhorn_forward_cuda(*args, 1, 0, 0)


@needs_kd
def test_bad_codes_raise_value_errors_naming_the_argument():
    x = torch.randn(2, 8)
    loss, stats = torch.empty(2), torch.empty(2, 5)
    bad_dtype = (x.data_ptr(), 3, 1, 8, 0, 1)  # float64: not a kernel dtype
    with pytest.raises(ValueError, match="student must be float32, float16 or bfloat16"):
        _C.kd_rows_forward_cpu(2, 8, bad_dtype, _cpu_tensor_view(x), 0, -100, (0, 1.0, 0.0, 0.0, 0.0),
                               loss.data_ptr(), stats.data_ptr(), 1)
    with pytest.raises(ValueError, match="divergence code"):
        _C.kd_rows_forward_cpu(2, 8, _cpu_tensor_view(x), _cpu_tensor_view(x), 0, -100, (9, 1.0, 0.0, 0.0, 0.0),
                               loss.data_ptr(), stats.data_ptr(), 1)
    with pytest.raises(TypeError, match="student: the compiled kernels take float32"):
        native_kd.kd_rows_forward(x.double(), x, None, make_spec("forward_kl"), -100)


def _special_floats():
    tiny = torch.finfo(torch.float16).tiny
    values = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, math.inf, -math.inf, math.nan,
              tiny, tiny / 3, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-26, 1e-40, 3.0e38,
              1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]
    return torch.cat([torch.tensor(values), torch.randn(20000) * 1e3, torch.randn(20000) * 1e-6,
                      torch.randn(20000)])


@needs_kd
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_match_torch_bit_for_bit(dtype):
    # kl_div_rows_backward writes −target·grad_rows in the input's dtype: with grad_rows = −1 it
    # stores the target, which exercises each conversion alone.
    all_bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    loaded = native_kd.kl_div_rows_backward(-torch.ones(1), torch.zeros(1, 2**16), all_bits[None], False)
    reference = all_bits.float()[None]
    same = (loaded == reference) | (loaded.isnan() & reference.isnan())
    assert same.all(), all_bits[~same[0]][:5]

    values = _special_floats()[None]
    stored = native_kd.kl_div_rows_backward(-torch.ones(1), torch.zeros_like(values, dtype=dtype), values, False)
    reference = values.to(dtype)
    same = (stored.view(torch.int16) == reference.view(torch.int16)) | (stored.isnan() & reference.isnan())
    assert same.all(), values[~same][:5]


@needs_kd
def test_vectorised_exp_is_as_accurate_as_torch():
    # kl_div_rows_backward with log_target writes −exp(target)·grad_rows: the kernels' exp. Its
    # arguments in the kernels are ≤ 0 or a few units: below -87 it gives 0, above 88 +inf.
    x = torch.cat([torch.linspace(-87, 88, 300001), torch.tensor([-math.inf, -87.5, -200.0, 0.0, 88.5])])[None]
    out = -native_kd.kl_div_rows_backward(torch.ones(1), x, x, True)
    ref = x.double().exp()
    assert ((out.double() - ref).abs() / ref)[0, :-5].max() < 1.5e-7
    assert out[0, -5:].tolist() == [0.0, 0.0, 0.0, 1.0, math.inf]


@needs_kd
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_results_do_not_depend_on_the_thread_count(divergence):
    student, teacher = torch.randn(37, 1001), torch.randn(37, 1001)
    spec = make_spec(divergence, temperature=1.3, beta=0.3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            loss, stats = native_kd.kd_rows_forward(student, teacher, None, spec, -100)
            grad = native_kd.kd_rows_backward(torch.ones(37), student, teacher, None, stats, spec, -100)
            results.append((loss, stats, grad))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_kd
def test_small_divergences_keep_their_relative_accuracy():
    # Nearly equal distributions: a loss of ~1e-2 whose log-normalisers are ~3.6. fp32 partial sums
    # would leave ~1e-7 absolute, 1e-5 relative, error; the kernels sum in double lanes.
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, 36, generator=generator) * 0.1
    teacher = torch.randn(1, 36, generator=generator) * 0.1
    for divergence in ("forward_kl", "reverse_kl"):
        loss, _ = native_kd.kd_rows_forward(student, teacher, None, make_spec(divergence), -100)
        ref = reference.row_losses(divergence, student.double(), teacher.double())
        assert rel_err(loss, ref) < 1e-6
