"""The compiled extension fastkd._C (its CPU kernels, bindings and contract), against float64
formulas and the contract as documented."""

import copy
import math

import pytest
import torch

import reference
from fastkd import available_backends
from fastkd.kernels import native_ext as native
from fastkd.kernels.logits import native as native_kd
from fastkd.kernels.logits import native_ce
from fastkd.divergences import make_spec
from reference import rel_err

_C = pytest.importorskip("fastkd._C", reason="the compiled extension is not built (FASTKD_BUILD_EXT=0?)")


# The contract as the design states it (DESIGN.md, csrc/include/fastkd/*/contract.h), written out
# here independently of both the C++ tables and fastkd/kernels/logits/contract.py.
DOCUMENTED_CONTRACT = {
    "divergence_codes": {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_forward_kl": 3,
                         "skew_reverse_kl": 4, "tvd": 5},
    "stats_columns": ["max_s", "log_sum_s", "max_t", "log_sum_t", "aux"],
    "standardized_stats_columns": ["max_s", "log_sum_s", "max_t", "log_sum_t", "aux", "mean_s", "std_s", "mean_t",
                                   "std_t"],
    "ce_stats_columns": ["max", "log_sum"],
    "dtype_codes": {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3},
    "sparse_stats_columns": ["max", "log_sum", "rest_max", "rest_log_sum"],
    "sparse_id_sentinel": 2 ** 31 - 1,
    "sparse_row_modes": {"normal": 0, "zero": 1, "nan": 2},
}


def test_contract_of_the_extension_is_the_documented_one():
    assert _C.contract() == DOCUMENTED_CONTRACT


def test_python_side_of_the_contract_is_the_documented_one():
    from fastkd.kernels.logits import contract

    assert native.expected_contract() == DOCUMENTED_CONTRACT
    assert native.check_contract(_C, native.expected_contract()) is None
    # The other Python places that index the statistics agree with the named columns.
    columns = DOCUMENTED_CONTRACT["stats_columns"]
    assert [contract.MAX_S, contract.LOG_SUM_S, contract.MAX_T, contract.LOG_SUM_T, contract.AUX] == \
        [columns.index(name) for name in ("max_s", "log_sum_s", "max_t", "log_sum_t", "aux")]
    assert contract.N_STATS == len(columns)
    wide = DOCUMENTED_CONTRACT["standardized_stats_columns"]
    assert [contract.MEAN_S, contract.STD_S, contract.MEAN_T, contract.STD_T] == \
        [wide.index(name) for name in ("mean_s", "std_s", "mean_t", "std_t")]
    assert contract.N_STANDARDIZED_STATS == len(wide) and wide[:len(columns)] == columns


def _drifted(**changes):
    expected = copy.deepcopy(DOCUMENTED_CONTRACT)
    expected.update(changes)
    return expected


def test_check_contract_describes_every_drift():
    wrong_code = _drifted(divergence_codes={**DOCUMENTED_CONTRACT["divergence_codes"], "jsd": 3})
    assert native.check_contract(_C, wrong_code) == (
        "fastkd._C was compiled with a different contract: divergence_codes['jsd'] is 2 in fastkd._C, 3 here")

    swapped = _drifted(stats_columns=["log_sum_s", "max_s", "max_t", "log_sum_t", "aux"])
    message = native.check_contract(_C, swapped)
    assert "stats_columns is ['max_s', 'log_sum_s'" in message and "['log_sum_s', 'max_s'" in message

    renamed = _drifted(dtype_codes={"float32": 0, "half": 1, "bfloat16": 2, "float64": 3})
    message = native.check_contract(_C, renamed)
    assert "dtype_codes['float16'] = 1 in fastkd._C is not expected here" in message
    assert "dtype_codes['half'] is missing from fastkd._C" in message

    missing_key = _drifted(sparse_columns=["index", "logprob"])
    extra_key = {key: value for key, value in DOCUMENTED_CONTRACT.items() if key != "ce_stats_columns"}
    assert "sparse_columns is missing from fastkd._C" in native.check_contract(_C, missing_key)
    assert "ce_stats_columns is in fastkd._C but not expected here" in native.check_contract(_C, extra_key)


def test_check_contract_reports_builds_without_a_usable_contract():
    class OldBuild:
        pass

    class BrokenBuild:
        @staticmethod
        def contract():
            raise RuntimeError("boom")

    assert "has no contract()" in native.check_contract(OldBuild(), DOCUMENTED_CONTRACT)
    assert native.check_contract(BrokenBuild(), DOCUMENTED_CONTRACT) == \
        "fastkd._C.contract() failed (RuntimeError: boom)"


def test_argument_structs_take_keywords_only_and_read_back():
    x = torch.randn(3, 4, 5)
    view = native.rows_view(x)
    assert (view.data, view.dtype, view.inner, view.stride_outer, view.stride_inner, view.stride_col) == \
        (x.data_ptr(), 0, 4, 20, 5, 1)
    with pytest.raises(TypeError):
        _C.RowsView(x.data_ptr(), 0, 4, 20, 5, 1)  # positional: the order would be repeated in Python
    params = _C.DivergenceParams(code=2, inv_temperature=0.5, param=0.25, log_param=-1.0, log1m_param=-0.5)
    args = _C.KdRowsArgs(n_rows=12, n_cols=5, student=view, teacher=view, labels=0, ignore_index=-100,
                         divergence=params)
    assert (args.n_rows, args.n_cols, args.labels, args.divergence.code, args.divergence.param) == (12, 5, 0, 2, 0.25)
    assert args.student.inner == 4
    outputs = _C.SinkhornOutputs(value=1, value_linear=2, f=3, g=4, n_iter=5, err=6)
    assert (outputs.err, outputs.plan, outputs.f_hist, outputs.g_hist) == (6, 0, 0, 0)


def test_extension_is_torch_abi_free():
    assert _C.with_cuda in (True, False)
    with open(_C.__file__, "rb") as handle:
        assert b"libtorch" not in handle.read()


# ---------------------------------------------------------------------------------------------
# The kd_rows / kl_div_rows kernels (csrc/logits/cpu.cpp). The kd_loss matrix in
# test_functional.py, test_properties.py and kernels/test_logits.py runs them as the "native"
# backend; the tests below cover what that matrix cannot see.
# ---------------------------------------------------------------------------------------------


def test_cpu_backend_is_available_and_under_test():
    from conftest import BACKENDS, DEVICE

    status = available_backends()["kd_rows"]["native"]
    assert status.available and "cpu" in status.devices, status
    assert DEVICE.type != "cpu" or "native" in BACKENDS


def _kd_args(x, code=0, student=None):
    params = _C.DivergenceParams(code=code, inv_temperature=1.0, param=0.0, log_param=-math.inf, log1m_param=0.0)
    return _C.KdRowsArgs(n_rows=x.shape[0], n_cols=x.shape[1], student=student or native.rows_view(x),
                         teacher=native.rows_view(x), labels=0, ignore_index=-100, divergence=params)


_CUDA_ERROR = "CUDA error in cudaGetDevice: cuda" if _C.with_cuda else "built without CUDA"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host addresses below must not reach a GPU")
def test_cuda_entry_points_raise_a_clear_error_without_a_gpu():
    # A build without CUDA says so; a CUDA build on a machine without a GPU (or driver) raises the
    # CUDA runtime's own error name and message from the first CUDA call.
    x = torch.randn(2, 8)
    loss, stats = torch.empty(2), torch.empty(2, 5)
    with pytest.raises(RuntimeError, match=_CUDA_ERROR):
        _C.kd_rows_forward_cuda(_kd_args(x), loss=loss.data_ptr(), stats=stats.data_ptr(), device=0, stream=0)
    labels = torch.zeros(2, dtype=torch.int64)
    ce_args = _C.CeRowsArgs(n_rows=2, n_cols=8, logits=native.rows_view(x), labels=labels.data_ptr(),
                            ignore_index=-100)
    with pytest.raises(RuntimeError, match=_CUDA_ERROR):
        _C.ce_rows_forward_cuda(ce_args, loss=loss.data_ptr(), stats=stats.data_ptr(), device=0, stream=0)


def _sinkhorn_entry_args(cost_dtype_code=0, max_iter=5):
    cost, a, b = torch.rand(4, 3), torch.full((1, 4), 0.25), torch.full((1, 3), 1 / 3)
    outputs = [torch.empty(1), torch.empty(1), torch.empty(1, 4), torch.empty(1, 3),
               torch.empty(1, dtype=torch.int32), torch.empty(1)]
    keep = (cost, a, b, outputs)
    args = _C.SinkhornArgs(
        n_problems=1, n=4, m=3, a=a.data_ptr(), b=b.data_ptr(), eps=0.1, max_iter=max_iter, tol=1e-6,
        cost=_C.CostView(data=cost.data_ptr(), dtype=cost_dtype_code, stride_b=0, stride_n=3, stride_m=1),
        save_history=False, return_plan=False)
    addresses = _C.SinkhornOutputs(**dict(zip(("value", "value_linear", "f", "g", "n_iter", "err"),
                                              (x.data_ptr() for x in outputs))))
    return keep, args, addresses


@pytest.mark.skipif(torch.cuda.is_available(), reason="the host addresses below must not reach a GPU")
def test_sinkhorn_cuda_entry_point_raises_a_clear_error_without_a_gpu():
    _keep, args, outputs = _sinkhorn_entry_args()
    with pytest.raises(RuntimeError, match=_CUDA_ERROR):
        _C.sinkhorn_forward_cuda(args, outputs=outputs, workspace=1, device=0, stream=0)


def test_sinkhorn_entry_points_check_their_arguments():
    _keep, args, outputs = _sinkhorn_entry_args(cost_dtype_code=3)  # float64: not a kernel dtype
    with pytest.raises(ValueError, match="cost must be float32, float16 or bfloat16"):
        _C.sinkhorn_forward_cpu(args, outputs=outputs, n_threads=1)
    _keep, args, outputs = _sinkhorn_entry_args(max_iter=0)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        _C.sinkhorn_forward_cpu(args, outputs=outputs, n_threads=1)
    # Checked before any CUDA call, in builds with and without CUDA, so this runs without a GPU.
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        _C.sinkhorn_forward_cuda(args, outputs=outputs, workspace=1, device=0, stream=0)


def test_bad_codes_raise_value_errors_naming_the_argument():
    x = torch.randn(2, 8)
    loss, stats = torch.empty(2), torch.empty(2, 5)
    bad_dtype = _C.RowsView(data=x.data_ptr(), dtype=3, inner=1, stride_outer=8, stride_inner=0, stride_col=1)
    with pytest.raises(ValueError, match="student must be float32, float16 or bfloat16"):
        _C.kd_rows_forward_cpu(_kd_args(x, student=bad_dtype), loss=loss.data_ptr(), stats=stats.data_ptr())
    with pytest.raises(ValueError, match="divergence code"):
        _C.kd_rows_forward_cpu(_kd_args(x, code=9), loss=loss.data_ptr(), stats=stats.data_ptr())
    with pytest.raises(ValueError, match="loss is a null pointer"):
        _C.kd_rows_forward_cpu(_kd_args(x), loss=0, stats=stats.data_ptr())
    with pytest.raises(TypeError, match="student: the compiled kernels take float32"):
        native_kd.kd_rows_forward(x.double(), x, None, make_spec("forward_kl"), -100)


def _special_floats():
    tiny = torch.finfo(torch.float16).tiny
    values = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, math.inf, -math.inf, math.nan,
              tiny, tiny / 3, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-26, 1e-40, 3.0e38,
              1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]
    return torch.cat([torch.tensor(values), torch.randn(20000) * 1e3, torch.randn(20000) * 1e-6,
                      torch.randn(20000)])


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


def test_vectorised_exp_is_as_accurate_as_torch():
    # kl_div_rows_backward with log_target writes −exp(target)·grad_rows: the kernels' exp. Its
    # arguments in the kernels are ≤ 0 or a few units: below -87 it gives 0, above 88 +inf.
    x = torch.cat([torch.linspace(-87, 88, 300001), torch.tensor([-math.inf, -87.5, -200.0, 0.0, 88.5])])[None]
    out = -native_kd.kl_div_rows_backward(torch.ones(1), x, x, True)
    ref = x.double().exp()
    assert ((out.double() - ref).abs() / ref)[0, :-5].max() < 1.5e-7
    assert out[0, -5:].tolist() == [0.0, 0.0, 0.0, 1.0, math.inf]


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


def test_thread_count_default_is_openmps():
    # n_threads ≤ 0 (the binding's default) means OpenMP's default thread count: same rows, same bits.
    student, teacher = torch.randn(23, 300), torch.randn(23, 300)
    params = _C.DivergenceParams(code=0, inv_temperature=1.0, param=0.0, log_param=-math.inf, log1m_param=0.0)
    args = _C.KdRowsArgs(n_rows=23, n_cols=300, student=native.rows_view(student), teacher=native.rows_view(teacher),
                         labels=0, ignore_index=-100, divergence=params)
    results = []
    for n_threads in ({}, {"n_threads": 1}, {"n_threads": -1}):
        loss, stats = torch.empty(23), torch.empty(23, 5)
        _C.kd_rows_forward_cpu(args, loss=loss.data_ptr(), stats=stats.data_ptr(), **n_threads)
        results.append((loss, stats))
    for loss, stats in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(stats, results[0][1])
    assert rel_err(results[0][0], reference.row_losses("forward_kl", student.double(), teacher.double())) < 1e-6


# ---------------------------------------------------------------------------------------------
# Hard-label cross-entropy rows (csrc/cross_entropy/cpu.cpp via fastkd/kernels/logits/native_ce.py),
# against the float64 formulas loss = logsumexp(x) − x[label], ∂loss/∂x = softmax(x) − onehot.
# ---------------------------------------------------------------------------------------------

IGNORE = -100


def _ce_case(n_cols, dtype, generator):
    """Rows: active ones (random logits, some −inf), ignored ones holding ±1e4 and NaN logits
    (which must be read by nobody), and active rows with labels V and −5 (out of range)."""
    n_rows = 11
    logits = torch.randn(n_rows, n_cols, generator=generator, dtype=torch.float64) * 3
    if n_cols > 3:
        logits[1, ::3] = -math.inf  # masked vocabulary entries; label 1 below stays finite
    logits[2] = 1e4 * torch.where(torch.rand(n_cols, generator=generator) < 0.5, 1.0, -1.0)  # ignored
    logits[5] = math.nan  # ignored
    labels = torch.randint(0, n_cols, (n_rows,), generator=generator)
    labels[1] = min(1, n_cols - 1)
    labels[[2, 5, 8]] = IGNORE
    labels[6] = n_cols
    labels[9] = -5
    return logits.to(dtype), labels


def _ce_reference(logits, labels):
    """float64 loss (N,) and softmax − onehot (N, V) of the rows whose label is in range."""
    x = logits.double()
    in_range = (labels >= 0) & (labels < x.shape[1])
    safe = torch.where(in_range, labels, 0)
    lse = torch.logsumexp(x, dim=1)
    loss = lse - x.gather(1, safe[:, None])[:, 0]
    grad = torch.softmax(x, dim=1) - torch.nn.functional.one_hot(safe, x.shape[1]).double()
    return loss, grad, in_range


@pytest.mark.parametrize("n_cols", [1, 7, 1271, 32003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ce_rows_forward_matches_float64(n_cols, dtype):
    generator = torch.Generator().manual_seed(n_cols)
    logits, labels = _ce_case(n_cols, dtype, generator)
    loss, stats = native_ce.ce_rows_forward(logits, labels, IGNORE)
    assert loss.dtype == stats.dtype == torch.float32 and stats.shape == (11, 2)

    ref_loss, _, in_range = _ce_reference(logits, labels)
    ignored = labels == IGNORE
    good = ~ignored & in_range
    # The kernels compute in fp32 from the stored (rounded) logits: the same inputs as the reference.
    assert rel_err(loss[good], ref_loss[good]) < 2e-6
    x = logits.double()
    row_max = x.max(dim=1).values
    assert torch.equal(stats[~ignored, 0].double(), row_max[~ignored])  # the max is exact
    log_sum = torch.logsumexp(x - row_max[:, None], dim=1)
    assert (stats[~ignored, 1].double() - log_sum[~ignored]).abs().max() < 2e-6
    assert loss[~ignored & ~in_range].isnan().all()  # out-of-range labels
    assert (loss[ignored] == 0).all() and (stats[ignored] == 0).all()  # ±1e4 and NaN rows read by nobody


@pytest.mark.parametrize("n_cols", [1, 7, 1271, 32003])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_ce_rows_backward_adds_softmax_minus_onehot_in_place(n_cols, dtype, out_dtype):
    generator = torch.Generator().manual_seed(n_cols + 1)
    logits, labels = _ce_case(n_cols, dtype, generator)
    _, stats = native_ce.ce_rows_forward(logits, labels, IGNORE)
    grad_loss = torch.rand(11, generator=generator, dtype=torch.float64) + 0.5
    # A gradient block already holding something of the size of the softmax terms.
    before = (torch.randn(11, n_cols, generator=generator, dtype=torch.float64) / n_cols).to(out_dtype)
    out = before.clone()
    result = native_ce.ce_rows_backward(grad_loss.float(), logits, labels, stats, IGNORE, out)
    assert result is out

    _, ref_grad, in_range = _ce_reference(logits, labels)
    ignored = labels == IGNORE
    good = ~ignored & in_range
    expected = before.double() + grad_loss[:, None] * ref_grad
    # Elementwise: one rounding to out's dtype at the end (half an ulp, or a subnormal step) plus the
    # fp32 math (exp of arguments up to ~20: a few 1e-7 relative), relative to the terms' size.
    onehot = torch.nn.functional.one_hot(torch.where(in_range, labels, 0), n_cols)
    scale = before.double().abs() + grad_loss[:, None] * (ref_grad + 2 * onehot)  # |before| + gl·(p + onehot)
    rel = {torch.float32: 4e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[out_dtype]
    subnormal_step = torch.finfo(out_dtype).smallest_normal * torch.finfo(out_dtype).eps
    err = (out[good].double() - expected[good]).abs()
    assert (err <= rel * scale[good] + subnormal_step).all(), err.max()
    assert torch.equal(out[ignored].view(torch.uint8), before[ignored].view(torch.uint8))  # untouched, bit for bit
    assert out[~ignored & ~in_range].isnan().all()


def test_ce_rows_accept_strided_rows_int32_labels_and_no_rows():
    wide = torch.randn(6, 40)
    logits = wide[:, 3:38]  # rows 40 apart, columns contiguous; misaligned for 16-byte loads
    labels = torch.tensor([0, 34, IGNORE, 7, 7, 12], dtype=torch.int32)
    loss, stats = native_ce.ce_rows_forward(logits, labels, IGNORE)
    ref_loss, ref_grad, _ = _ce_reference(logits, labels.long().where(labels != IGNORE, 0))
    active = labels != IGNORE
    assert rel_err(loss[active], ref_loss[active]) < 2e-6 and loss[2] == 0

    block = torch.zeros(6, 50)
    out = block[:, 5:40]
    native_ce.ce_rows_backward(torch.ones(6), logits, labels, stats, IGNORE, out)
    assert rel_err(out[active], ref_grad[active]) < 2e-6
    assert (block[:, :5] == 0).all() and (block[:, 40:] == 0).all() and (out[2] == 0).all()

    empty = torch.empty(0, 9)
    loss, stats = native_ce.ce_rows_forward(empty, torch.empty(0, dtype=torch.long), IGNORE)
    assert loss.shape == (0,) and stats.shape == (0, 2)
    out = torch.empty(0, 9)
    assert native_ce.ce_rows_backward(torch.empty(0), empty, torch.empty(0, dtype=torch.long), stats, IGNORE,
                                      out) is out


def test_ce_rows_reject_what_they_cannot_read():
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous rows"):
        native_ce.ce_rows_forward(torch.randn(9, 4).t(), labels, IGNORE)
    with pytest.raises(ValueError, match="contiguous rows"):
        native_ce.ce_rows_forward(torch.randn(2, 2, 4), labels, IGNORE)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        native_ce.ce_rows_forward(torch.randn(4, 9, dtype=torch.float64), labels, IGNORE)
    logits = torch.randn(4, 9)
    _, stats = native_ce.ce_rows_forward(logits, labels, IGNORE)
    with pytest.raises(ValueError, match="must match logits"):
        native_ce.ce_rows_backward(torch.ones(4), logits, labels, stats, IGNORE, torch.zeros(4, 8))
    bad_out = _C.GradRows(data=torch.zeros(4, 9, dtype=torch.float64).data_ptr(), dtype=3, stride_row=9)
    args = _C.CeRowsArgs(n_rows=4, n_cols=9, logits=native.rows_view(logits), labels=labels.data_ptr(),
                         ignore_index=IGNORE)
    with pytest.raises(ValueError, match="out must be float32, float16 or bfloat16"):
        _C.ce_rows_backward_cpu(args, grad_loss=torch.ones(4).data_ptr(), stats=stats.data_ptr(), out=bad_out)
