"""fused_linear_topk against float64 eager top-k of the full log-softmax (hidden @ weight.T)."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE, each_backend
from fastkd.kernels.topk import torch as topk_torch
from reference import rel_err


@pytest.fixture
def small_blocks(monkeypatch):
    # Vocabulary blocks of ≥ 40 entries (≥ k) and as many rows as 400 elements hold: every test
    # crosses row and vocabulary blocks, blocks of unequal widths, and the intermediate
    # merges of the candidate slots (more blocks than slots).
    monkeypatch.setitem(topk_torch.BLOCK_ELEMENTS, DEVICE.type, 400)
    monkeypatch.setitem(topk_torch.VOCAB_BLOCK, DEVICE.type, 40)


def _reference_logprobs(hidden, weight, bias, temperature, vocab):
    logits = hidden.double() @ weight[:vocab].double().t()
    if bias is not None:
        logits = logits + bias[:vocab].double()
    return torch.log_softmax(logits / temperature, -1)


def _assert_is_a_top_k(out, ref_logprobs, k, tolerance):
    """Tie-tolerant: the values are the k largest (sorted), each id's reference log-prob is its
    reported one, the ids of a row are distinct and inside the vocabulary."""
    indices, logprobs = out.indices.reshape(-1, k), out.logprobs.reshape(-1, k)
    ref_logprobs = ref_logprobs.reshape(-1, ref_logprobs.shape[-1])
    assert torch.isfinite(logprobs).all()
    assert ((indices >= 0) & (indices < ref_logprobs.shape[-1])).all()
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()
    assert (logprobs.diff(dim=-1) <= 0).all(), "rows are not in decreasing order"
    assert rel_err(logprobs, ref_logprobs.topk(k, dim=-1).values) < tolerance
    assert rel_err(logprobs, ref_logprobs.gather(1, indices)) < tolerance


@each_backend("topk")
@pytest.mark.parametrize("k", [1, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_eager(backend, k, temperature, dtype, small_blocks):
    # N=41 over two leading dims, padded vocabulary 1271 of 1280 rows, a bias.
    hidden = torch.randn(1, 41, 24, dtype=torch.float64, device=DEVICE).to(dtype)
    weight = (torch.randn(1280, 24, dtype=torch.float64, device=DEVICE) * 0.6).to(dtype)
    bias = torch.randn(1280, dtype=torch.float64, device=DEVICE).to(dtype)
    out = fastkd.fused_linear_topk(hidden, weight, k, temperature=temperature, bias=bias, vocab_size=1271,
                                   backend=backend)
    assert isinstance(out, fastkd.TopK) and out.indices.shape == out.logprobs.shape == (1, 41, k)
    assert out.indices.dtype == torch.int64 and out.logprobs.dtype == (torch.float64 if dtype == torch.float64
                                                                       else torch.float32)
    ref = _reference_logprobs(hidden, weight, bias, temperature, 1271)
    _assert_is_a_top_k(out, ref, k, TOLERANCE[dtype])


def test_k_equal_to_the_vocabulary_is_the_sorted_log_softmax(small_blocks):
    hidden, weight = torch.randn(9, 16, device=DEVICE), torch.randn(333, 16, device=DEVICE)
    out = fastkd.fused_linear_topk(hidden, weight, 333)
    ref = _reference_logprobs(hidden, weight, None, 1.0, 333)
    _assert_is_a_top_k(out, ref, 333, TOLERANCE[torch.float32])
    assert (out.indices.sort(-1).values == torch.arange(333, device=DEVICE)).all()


def test_logits_of_a_hundred(small_blocks):
    # Logits of ±100 and more: fp32 exp would overflow without the running maximum.
    hidden = torch.randn(37, 16, device=DEVICE) * 10
    weight = torch.randn(517, 16, device=DEVICE) * 3
    ref = _reference_logprobs(hidden, weight, None, 1.0, 517)
    logits = hidden.double() @ weight.double().t()
    assert logits.abs().max() > 100
    out = fastkd.fused_linear_topk(hidden, weight, 5)
    _assert_is_a_top_k(out, ref, 5, TOLERANCE[torch.float32])
    # One logit of exactly +100 in a row of -100s (ones hidden, weight of ±100/16 per column).
    hidden, weight = torch.ones(3, 16, device=DEVICE), torch.full((250, 16), -100 / 16, device=DEVICE)
    weight[123] = 100 / 16
    out = fastkd.fused_linear_topk(hidden, weight, 2)
    assert (out.indices[:, 0] == 123).all()
    assert torch.allclose(out.logprobs[:, 0].double(), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out.logprobs[:, 1].double(), torch.full((3,), -200.0 - math.log1p(249 * math.exp(-200)),
                                                                  dtype=torch.float64), rtol=1e-6)


def test_ties_across_vocabulary_blocks(small_blocks):
    # Small integers: exact integer logits in [-8, 8], so most entries tie, within and across the
    # vocabulary blocks; whichever tied ids are kept, the k values must be the k largest.
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randint(-2, 3, (29, 4), generator=generator).float().to(DEVICE)
    weight = torch.randint(-1, 2, (431, 4), generator=generator).float().to(DEVICE)
    for k in (1, 13, 150):
        out = fastkd.fused_linear_topk(hidden, weight, k)
        ref = _reference_logprobs(hidden, weight, None, 1.0, 431)
        _assert_is_a_top_k(out, ref, k, TOLERANCE[torch.float32])


def test_bf16_inputs(small_blocks):
    hidden = torch.randn(33, 32, device=DEVICE, dtype=torch.float64)
    weight = torch.randn(777, 32, device=DEVICE, dtype=torch.float64) * 0.5
    out = fastkd.fused_linear_topk(hidden.bfloat16(), weight.bfloat16(), 10)
    assert out.logprobs.dtype == torch.float32
    # Against the exact product: the bf16 rounding of the inputs and logits is all the error.
    ref = _reference_logprobs(hidden, weight, None, 1.0, 777)
    assert rel_err(out.logprobs, ref.topk(10).values) < TOLERANCE[torch.bfloat16]
    assert rel_err(out.logprobs, ref.gather(1, out.indices)) < TOLERANCE[torch.bfloat16]
    # An fp32 lm_head next to bf16 activations is cast, as autocast would cast it.
    mixed = fastkd.fused_linear_topk(hidden.bfloat16(), weight.bfloat16().float(), 10)
    assert torch.equal(mixed.indices, out.indices) and torch.equal(mixed.logprobs, out.logprobs)


def test_ignored_rows_are_padding_and_do_not_leak(small_blocks):
    hidden = torch.randn(12, 16, device=DEVICE)
    weight = torch.randn(250, 16, device=DEVICE)
    labels = torch.randint(0, 250, (12,), device=DEVICE)
    labels[[0, 5, 11]] = -100
    hidden[5] = math.nan  # padding positions may hold anything
    out = fastkd.fused_linear_topk(hidden, weight, 4, labels=labels)
    ignored = labels == -100
    assert (out.indices[ignored] == fastkd.topk.PAD_ID).all()
    assert (out.logprobs[ignored] == -math.inf).all()
    ref = _reference_logprobs(hidden[~ignored], weight, None, 1.0, 250)
    kept = fastkd.TopK(out.indices[~ignored], out.logprobs[~ignored])
    _assert_is_a_top_k(kept, ref, 4, TOLERANCE[torch.float32])
    # The same labels make a sparse loss skip the padded rows.
    student = torch.randn(12, 250, device=DEVICE, requires_grad=True)
    loss = fastkd.sparse_kd_loss(student, *out, labels, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert torch.isfinite(loss).all() and (loss[ignored] == 0).all() and (grad[ignored] == 0).all()


@pytest.mark.parametrize("missing_mass", ["renormalize", "tail"])
def test_output_feeds_the_sparse_losses(missing_mass, small_blocks):
    hidden = torch.randn(2, 6, 16, device=DEVICE)
    weight = torch.randn(300, 16, device=DEVICE) * 0.4
    out = fastkd.fused_linear_topk(hidden, weight, 8)
    ref = _reference_logprobs(hidden, weight, None, 1.0, 300).reshape(12, 300)
    ref_values, ref_indices = ref.topk(8, dim=-1)
    student_hidden = torch.randn(2, 6, 16, device=DEVICE)
    student_weight = torch.randn(300, 16, device=DEVICE) * 0.4
    fused = fastkd.fused_linear_sparse_kd_loss(student_hidden, student_weight, *out, missing_mass=missing_mass)
    expected = fastkd.sparse_kd_loss((student_hidden @ student_weight.t()).reshape(12, 300).double(), ref_indices,
                                     ref_values, missing_mass=missing_mass)
    assert rel_err(fused, expected) < 2e-5


def test_compiles_fullgraph_without_host_synchronisation():
    hidden, weight = torch.randn(10, 8, device=DEVICE), torch.randn(90, 8, device=DEVICE)
    labels = torch.randint(0, 90, (10,), device=DEVICE)
    labels[3] = -100

    def topk(hidden, weight, labels):
        return fastkd.fused_linear_topk(hidden, weight, 6, temperature=2.0, labels=labels)

    torch._dynamo.reset()
    compiled = torch.compile(topk, fullgraph=True, backend="aot_eager")(hidden, weight, labels)
    eager = topk(hidden, weight, labels)
    assert torch.equal(compiled.indices, eager.indices) and torch.equal(compiled.logprobs, eager.logprobs)


def test_runs_on_a_device_without_kernels():
    # "meta" stands in for every device PyTorch has: the fake implementation gives the shapes.
    hidden, weight = torch.randn(2, 5, 8, device="meta"), torch.randn(40, 8, device="meta")
    out = fastkd.fused_linear_topk(hidden, weight, 4, labels=torch.zeros(2, 5, dtype=torch.long, device="meta"))
    assert out.indices.shape == out.logprobs.shape == (2, 5, 4) and out.indices.device.type == "meta"
    assert (out.indices.dtype, out.logprobs.dtype) == (torch.int64, torch.float32)


def test_no_gradient_flows():
    hidden = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(30, 8, device=DEVICE))
    out = fastkd.fused_linear_topk(hidden, weight, 3)
    assert not out.logprobs.requires_grad


BAD = [
    (dict(k=0), ValueError, ["k must lie in [1, V=50]"]),
    (dict(k=51), ValueError, ["k must lie in [1, V=50]"]),
    (dict(k=40, vocab_size=30), ValueError, ["k must lie in [1, V=30]"]),
    (dict(k=2.0), TypeError, ["k must be an int"]),
    (dict(temperature=0.0), ValueError, ["temperature"]),
    (dict(vocab_size=51), ValueError, ["vocab_size", "[1, 50]"]),
    (dict(weight=torch.randn(50, 9)), ValueError, ["weight", "H=9", "hidden"]),
    (dict(bias=torch.randn(49)), ValueError, ["bias"]),
    (dict(hidden=torch.randint(0, 3, (4, 8))), TypeError, ["hidden", "floating-point"]),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, ["labels", "(4,)"]),
    (dict(backend="triton"), ValueError, ["backend='triton'", "'torch'"]),
]


@pytest.mark.parametrize("overrides,error,words", BAD)
def test_bad_arguments_name_the_argument(overrides, error, words):
    arguments = dict(hidden=torch.randn(4, 8), weight=torch.randn(50, 8), k=3)
    arguments.update(overrides)
    arguments = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
                 for name, value in arguments.items()}
    with pytest.raises(error) as info:
        fastkd.fused_linear_topk(**arguments)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from getrusage")
def test_memory_is_bounded_independently_of_n():
    # V=32000: at N=8192 one (N, V) fp32 tensor of logits is 1000 MiB. The call's peak RSS growth
    # must stay far below it, and must not grow with N beyond the (N, k) outputs (6 MiB).
    script = textwrap.dedent("""
        import resource, torch, fastkd
        torch.set_num_threads(2)
        v, h = 32000, 64
        hidden, weight = torch.randn(8192, h), torch.randn(v, h) * 0.1
        fastkd.fused_linear_topk(hidden[:8], weight, 64)  # warm-up allocations
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        small = fastkd.fused_linear_topk(hidden[:2048], weight, 64)
        after_small = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        large = fastkd.fused_linear_topk(hidden, weight, 64)
        print((after_small - base) / 1024, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    small_mib, large_mib = map(float, out.stdout.strip().splitlines()[-1].split())
    one_full_logits_mib = 8192 * 32000 * 4 / 2**20
    assert large_mib < one_full_logits_mib / 8, (small_mib, large_mib)
    assert large_mib < small_mib + 24, (small_mib, large_mib)
