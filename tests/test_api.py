"""The public surface as training code meets it: every device through the fakes, default arguments
under torch.compile(fullgraph=True), autocast and mixed dtypes, one argument order, modules for
every loss, the components of the fused losses."""

import inspect

import pytest
import torch

import fastkd
from conftest import DEVICE, TOLERANCE
from reference import fused_linear_loss, loss_and_grad, reduce, rel_err, row_losses

V = 37


def _logits(*shape, dtype=torch.float32, device=DEVICE):
    return (torch.randn(*shape, dtype=torch.float64) * 3).to(device=device, dtype=dtype)


def _labels(*shape, device=DEVICE):
    labels = torch.randint(0, V, shape, device=device)
    labels.view(-1)[1] = -100
    return labels


def _top_k(n_rows, k=5, device=DEVICE):
    logprobs, indices = torch.log_softmax(torch.randn(n_rows, V, device=device), -1).topk(k, dim=-1)
    return indices, logprobs


def _every_loss(device):
    """(name, callable of no arguments) for every public loss, with its default options."""
    s, t, labels = _logits(2, 3, V, device=device), _logits(2, 3, V, device=device), _labels(2, 3, device=device)
    s.requires_grad_(True)
    hidden, weight = _logits(6, 8, device=device), _logits(V, 8, device=device) * 0.1
    hidden.requires_grad_(True)
    indices, logprobs = _top_k(6, device=device)
    cost = torch.rand(V, V, device=device)
    return [
        ("kd_loss", lambda: fastkd.kd_loss(s, t, labels)),
        ("sparse_kd_loss", lambda: fastkd.sparse_kd_loss(s.reshape(6, V), indices, logprobs, labels.reshape(6))),
        ("fused_linear_kd_loss", lambda: fastkd.fused_linear_kd_loss(hidden, weight, hidden.detach(), weight,
                                                                     labels.reshape(6))),
        ("fused_linear_sparse_kd_loss", lambda: fastkd.fused_linear_sparse_kd_loss(hidden, weight, indices, logprobs,
                                                                                   labels.reshape(6))),
        ("sampled_kd_loss", lambda: fastkd.sampled_kd_loss(s.reshape(6, V), indices, logprobs.exp(),
                                                           labels.reshape(6))),
        ("fused_linear_sampled_kd_loss", lambda: fastkd.fused_linear_sampled_kd_loss(
            hidden, weight, indices, logprobs.exp(), labels.reshape(6))),
        ("sinkhorn", lambda: fastkd.sinkhorn(cost.requires_grad_(True), max_iter=5).value),
        ("wasserstein_kd_loss", lambda: fastkd.wasserstein_kd_loss(s, t, labels.clamp(min=0), cost=cost)),
        ("sinkhorn_kd_loss", lambda: fastkd.sinkhorn_kd_loss(s, t, labels)),
        ("uld_loss", lambda: fastkd.uld_loss(s, t, labels)),
    ]


LOSS_NAMES = [name for name, _ in _every_loss(torch.device("cpu"))]


@pytest.mark.parametrize("index", range(len(LOSS_NAMES)), ids=LOSS_NAMES)
def test_every_loss_runs_on_a_device_without_kernels(index):
    # The "meta" device stands in for mps, xpu and every other device: only the torch backend and
    # the fake implementations serve it, forward and backward.
    name, loss_fn = _every_loss(torch.device("meta"))[index]
    loss = loss_fn()
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()


@pytest.mark.parametrize("index", range(len(LOSS_NAMES)), ids=LOSS_NAMES)
def test_every_loss_compiles_fullgraph_with_default_arguments(index):
    # fullgraph=True fails on any host synchronisation (.item(), bool(tensor)) in the default path.
    torch._dynamo.reset()
    name, loss_fn = _every_loss(DEVICE)[index]
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager = loss_fn()
    assert rel_err(compiled(), eager) < 1e-6, name


def test_labels_are_the_third_argument_everywhere():
    for function in (fastkd.kd_loss, fastkd.fused_linear_kd_loss, fastkd.wasserstein_kd_loss,
                     fastkd.sinkhorn_kd_loss, fastkd.uld_loss):
        parameters = list(inspect.signature(function).parameters.values())
        position = 4 if function is fastkd.fused_linear_kd_loss else 2
        assert parameters[position].name == "labels", function.__name__
        assert all(p.kind == p.KEYWORD_ONLY for p in parameters[position + 1:]), function.__name__
    for function in (fastkd.sparse_kd_loss, fastkd.fused_linear_sparse_kd_loss):
        names = [p.name for p in inspect.signature(function).parameters.values()]
        assert names.index("labels") == names.index("teacher_logprobs") + 1
    for function in (fastkd.sampled_kd_loss, fastkd.fused_linear_sampled_kd_loss):
        names = [p.name for p in inspect.signature(function).parameters.values()]
        assert names.index("labels") == names.index("sample_weights") + 1


def test_modules_take_labels_third_and_normalizer_by_keyword():
    s, t, labels = _logits(4, V), _logits(4, V), _labels(4)
    loss = fastkd.KDLoss("jsd")(s, t, labels)
    assert torch.equal(loss, fastkd.kd_loss(s, t, labels, divergence="jsd"))
    with pytest.raises(TypeError):
        fastkd.KDLoss()(s, t, labels, 3.0)  # once taken as the normalizer
    assert torch.equal(fastkd.KDLoss()(s, t, labels, normalizer=3.0),
                       fastkd.kd_loss(s, t, labels, normalizer=3.0))


def test_a_module_for_every_loss():
    s, t, labels = _logits(5, V), _logits(5, V), _labels(5)
    cost = torch.rand(V, V, device=DEVICE)
    pairs = [
        (fastkd.WassersteinKDLoss(cost, temperature=2.0), fastkd.wasserstein_kd_loss(
            s, t, labels.clamp(min=0), cost=cost, temperature=2.0)),
        (fastkd.SinkhornKDLoss(max_iter=7), fastkd.sinkhorn_kd_loss(s, t, labels, max_iter=7)),
        (fastkd.ULDLoss(top_k=5), fastkd.uld_loss(s, t, labels, top_k=5)),
    ]
    for module, expected in pairs:
        got = module(s, t, labels.clamp(min=0) if isinstance(module, fastkd.WassersteinKDLoss) else labels)
        assert torch.equal(got, expected), type(module).__name__
    assert "temperature=2.0" in repr(pairs[0][0])
    with pytest.raises(ValueError, match="eps"):
        fastkd.SinkhornKDLoss(eps=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        fastkd.WassersteinKDLoss(cost, max_iter=0)


def test_sinkhorn_functions_share_their_names_and_eps():
    for function in (fastkd.sinkhorn, fastkd.wasserstein_kd_loss, fastkd.sinkhorn_kd_loss):
        parameters = inspect.signature(function).parameters
        assert "max_iter" in parameters and "n_iters" not in parameters, function.__name__
        assert parameters["eps"].default == fastkd.ot.DEFAULT_EPS, function.__name__


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_loss_components_match_their_definitions(reduction):
    hidden, weight = _logits(7, 12), _logits(V, 12) * 0.2
    teacher_hidden, teacher_weight = _logits(7, 9), _logits(V, 9) * 0.2
    labels = _labels(7)
    options = dict(divergence="jsd", temperature=2.0, temperature_squared=True, soft_weight=0.7, hard_weight=0.3,
                   reduction=reduction)
    out = fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, return_components=True,
                                      **options)
    assert isinstance(out, fastkd.FusedLoss)
    student = hidden.double() @ weight.double().t()
    teacher = teacher_hidden.double() @ teacher_weight.double().t()
    soft = reduce(row_losses("jsd", student, teacher, 2.0) * 4.0, labels, -100, reduction, None)
    hard = reduce(torch.nn.functional.cross_entropy(student, torch.where(labels == -100, 0, labels),
                                                    reduction="none"), labels, -100, reduction, None)
    assert rel_err(out.soft, soft) < 1e-5 and rel_err(out.hard, hard) < 1e-5
    assert rel_err(out.loss, 0.7 * soft + 0.3 * hard) < 1e-5
    assert int(out.n_tokens) == int((labels != -100).sum())
    assert not out.soft.requires_grad and not out.hard.requires_grad
    plain = fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, **options)
    assert torch.equal(plain, out.loss)


def test_jsd_end_points_run_the_kl_kernels_on_every_backend():
    s, t = _logits(6, V), _logits(6, V)
    for backend in fastkd.kernels.registry.usable_backends("kd_rows", DEVICE.type):
        for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
            jsd = fastkd.kd_loss(s, t, divergence="jsd", beta=beta, temperature=0.5, backend=backend,
                                 reduction="none")
            kl = fastkd.kd_loss(s, t, divergence=divergence, temperature=0.5, backend=backend, reduction="none")
            assert torch.equal(jsd, kl), (backend, beta)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_kd_loss_inside_autocast(divergence):
    # Autocast leaves the custom ops alone: fp32 logits stay fp32 and the numbers do not move.
    s, t, labels = _logits(2, 5, V), _logits(2, 5, V), _labels(2, 5)
    s.requires_grad_(True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fastkd.kd_loss(s, t, labels, divergence=divergence, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, s)
    ref, ref_grad = loss_and_grad(s, t, divergence=divergence, temperature=2.0, labels=labels)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert rel_err(loss, ref) < TOLERANCE[torch.float32] and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("under_autocast", [False, True])
def test_fused_loss_with_bf16_activations_and_fp32_weights(under_autocast):
    # What autocast hands a loss: bf16 hidden states (the model's matmuls ran in bf16) next to the
    # fp32 lm_head parameter. The logits are formed in bf16; the weight's gradient comes back fp32.
    torch.manual_seed(3)
    hidden = _logits(9, 16, dtype=torch.bfloat16).requires_grad_(True)
    weight = (_logits(V, 16) * 0.1).requires_grad_(True)
    bias = (_logits(V) * 0.1).requires_grad_(True)
    teacher_hidden, teacher_weight = _logits(9, 12, dtype=torch.bfloat16), _logits(V, 12) * 0.1
    labels = _labels(9)
    options = dict(hard_weight=0.5, divergence="reverse_kl", temperature=1.5)
    context = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if under_autocast else torch.enable_grad()
    with context:
        loss = fastkd.fused_linear_kd_loss(hidden, weight, teacher_hidden, teacher_weight, labels, student_bias=bias,
                                           **options)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    # The reference rounds the weights to bf16 as the matmul did, then computes in float64.
    leaves = [hidden.detach().double().requires_grad_(True), weight.detach().bfloat16().double().requires_grad_(True),
              bias.detach().bfloat16().double().requires_grad_(True)]
    ref = fused_linear_loss(leaves[0], leaves[1], teacher_hidden.double(), teacher_weight.bfloat16().double(), labels,
                            student_bias=leaves[2], **options)
    ref_grads = torch.autograd.grad(ref, leaves)
    assert rel_err(loss, ref) < 1e-2
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < TOLERANCE[torch.bfloat16]


NEW_BAD_INPUTS = [
    (lambda: fastkd.fused_linear_kd_loss(*_fused_inputs(), return_components=1), TypeError, "return_components"),
    (lambda: fastkd.fused_linear_kd_loss(_logits(3, 4), _logits(V, 4).long(), _logits(3, 4), _logits(V, 4)),
     TypeError, "student_weight must be a floating-point tensor"),
    (lambda: fastkd.wasserstein_kd_loss(_logits(3, V), _logits(3, V)), TypeError, "cost"),
    (lambda: fastkd.kd_loss(_logits(3, V), _logits(3, V), None, "jsd"), TypeError, "positional"),
    (lambda: fastkd.sparse_kd_loss(_logits(3, V), *_top_k(3), validate="yes"), TypeError, "validate"),
]


def _fused_inputs():
    return _logits(3, 4), _logits(V, 4), _logits(3, 4), _logits(V, 4)


@pytest.mark.parametrize("call,error,words", NEW_BAD_INPUTS)
def test_new_options_reject_bad_input_by_name(call, error, words):
    with pytest.raises(error, match=words):
        call()
