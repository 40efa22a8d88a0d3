"""TRL 1.16 drop-ins beyond GKD's plain call: tensor beta / temperature in generalized_jsd_loss,
GOLD's logits_are_probs variant and the on-policy top-k / tail-bucket divergence, each against an
independent float64 transcription of TRL's definition and against TRL's own functions (compiled
from the installed wheel's source; see peers.py) when TRL is installed."""

import math

import pytest
import torch

from fastkd.compat import generalized_jsd_loss, gold_generalized_jsd_loss, topk_generalized_jsd_loss
from agreement import assert_agrees_like_peer
from peers import skip_reason, trl_functions
from reference import rel_err

TRL_SKIP = skip_reason("trl")


def _jsd_terms(log_q, log_p, beta):
    """The generalized JSD element-wise, float64, from log-probabilities (TRL's F.kl_div form)."""
    q, p = log_q.exp(), log_p.exp()
    if beta == 0:
        return torch.where(p > 0, p * (log_p - log_q), 0.0)
    if beta == 1:
        return torch.where(q > 0, q * (log_q - log_p), 0.0)
    log_m = torch.log(beta * p + (1 - beta) * q)
    return beta * torch.where(p > 0, p * (log_p - log_m), 0.0) + (1 - beta) * torch.where(q > 0, q * (log_q - log_m), 0.0)


def _reduce(terms, labels, reduction, first_dim, num_items=None):
    keep = None if labels is None else labels != -100
    if keep is not None:
        terms = terms[keep]
    if num_items is not None:
        return terms.sum() / num_items
    if reduction == "batchmean":
        return terms.sum() / (max(int(keep.sum()), 1) if keep is not None else max(first_dim, 1))
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / max(terms.numel(), 1)
    return terms


def _logits_case(B=3, T=6, V=1271, scale=100.0, dtype=torch.float32):
    student = (torch.randn(B, T, V) * scale / 3).clamp(-scale, scale).to(dtype)
    teacher = (torch.randn(B, T, V) * scale / 3).clamp(-scale, scale).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.3] = -100
    return student, teacher, labels


def _grad(loss, leaf):
    return torch.autograd.grad(loss.sum(), leaf)[0]


# --- tensor beta and temperature --------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature_kind", ["scalar", "per_token", "requires_grad"])
def test_tensor_beta_and_temperature(beta, temperature_kind):
    student, teacher, labels = _logits_case(scale=10.0)
    temperature = {"scalar": torch.tensor(1.7), "per_token": 1 + torch.rand(3, 6, 1),
                   "requires_grad": torch.tensor(1.7, requires_grad=True)}[temperature_kind]
    student.requires_grad_(True)
    ours = generalized_jsd_loss(student, teacher, labels, torch.tensor(beta), temperature)
    leaf = student.detach().double().requires_grad_(True)
    leaf_t = temperature.detach().double().requires_grad_(temperature.requires_grad)
    ref = _reduce(_jsd_terms(torch.log_softmax(leaf / leaf_t, -1), torch.log_softmax(teacher.double() / leaf_t, -1),
                             beta), labels, "batchmean", 3)
    assert rel_err(ours, ref) < 5e-6
    leaves = (student, temperature) if temperature.requires_grad else (student,)
    ref_leaves = (leaf, leaf_t) if temperature.requires_grad else (leaf,)
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(ref, ref_leaves)):
        assert rel_err(a, b) < 1e-5


def test_tensor_arguments_errors_are_named():
    student, teacher, labels = _logits_case(V=11)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(student, teacher, labels, beta=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_loss(student, teacher, labels, temperature=torch.ones(4, 1, 1, 1))
    with pytest.raises(ValueError, match="vocabulary"):
        generalized_jsd_loss(student, teacher[..., :10], labels)


@pytest.mark.skipif(TRL_SKIP is not None, reason=str(TRL_SKIP))
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_tensor_arguments_match_trl_itself(beta):
    (trl_loss,) = trl_functions("experimental/gkd/gkd_trainer.py", "GKDTrainer.generalized_jsd_loss")
    student, teacher, labels = _logits_case(scale=10.0)
    student.requires_grad_(True)
    for temperature in (torch.tensor(1.7), 1 + torch.rand(3, 6, 1)):
        ours = generalized_jsd_loss(student, teacher, labels, torch.tensor(beta), temperature)
        with _no_check():
            theirs = trl_loss(student, teacher, labels, torch.tensor(beta), temperature)
        assert rel_err(ours, theirs) < 1e-5 and rel_err(_grad(ours, student), _grad(theirs, student)) < 1e-5


class _no_check:
    # TRL's torch.tensor(beta) on a tensor warns; the comparison does not care.
    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


# --- GOLD: logits_are_probs -------------------------------------------------------------------

def _gold_definition(student_probs, teacher_probs, labels, beta, reduction):
    terms = _jsd_terms(torch.log(student_probs.double().clamp_min(1e-8)),
                       torch.log(teacher_probs.double().clamp_min(1e-8)), beta)
    return _reduce(terms, labels, reduction, student_probs.shape[0])


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gold_probs_match_definition(beta, reduction, dtype):
    student, teacher, labels = _logits_case(scale=30.0)
    student_probs = torch.softmax(student, -1).to(dtype).requires_grad_(True)
    teacher_probs = torch.softmax(teacher, -1).to(dtype).requires_grad_(True)  # TRL lets it have a gradient
    ours = gold_generalized_jsd_loss(student_probs, teacher_probs, labels, beta, 2.0, reduction, True)
    leaves = [t.detach().double().requires_grad_(True) for t in (student_probs, teacher_probs)]
    ref = _gold_definition(*leaves, labels, beta, reduction)
    tolerance = 5e-6 if dtype == torch.float32 else 1e-5  # computed in float32 from the bf16 values
    assert ours.shape == ref.shape and rel_err(ours, ref) < tolerance
    grads = torch.autograd.grad(ours.sum(), (student_probs, teacher_probs))
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), leaves)):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 1.6e-2)


def test_gold_logits_path_is_gkd_and_all_ignored_is_zero():
    student, teacher, labels = _logits_case(V=97, scale=5.0)
    assert rel_err(gold_generalized_jsd_loss(student, teacher, labels, 0.3, 1.5),
                   generalized_jsd_loss(student, teacher, labels, 0.3, 1.5)) == 0
    labels[:] = -100
    probs = torch.softmax(student, -1).requires_grad_(True)
    for reduction in ("batchmean", "mean", "sum"):
        loss = gold_generalized_jsd_loss(probs, torch.softmax(teacher, -1), labels, 0.5, 1.0, reduction, True)
        assert loss.item() == 0.0 and not _grad(loss, probs).any()


@pytest.mark.skipif(TRL_SKIP is not None, reason=str(TRL_SKIP))
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
def test_gold_matches_trl_itself(beta, reduction):
    (trl_loss,) = trl_functions("experimental/gold/gold_trainer.py", "GOLDTrainer.generalized_jsd_loss")
    student, teacher, labels = _logits_case(scale=30.0)
    probs = torch.softmax(student, -1).requires_grad_(True)
    teacher_probs = torch.softmax(teacher, -1)
    for logits_are_probs, s in ((True, probs), (False, student.requires_grad_(True))):
        t = teacher_probs if logits_are_probs else teacher
        ours = gold_generalized_jsd_loss(s, t, labels, beta, 1.3, reduction, logits_are_probs, None)
        theirs = trl_loss(s, t, labels, beta, 1.3, reduction, logits_are_probs, None)
        leaf = s.detach().double().requires_grad_(True)
        if logits_are_probs:
            exact = _gold_definition(leaf, t, labels, beta, reduction)
        else:
            exact = _reduce(_jsd_terms(torch.log_softmax(leaf / 1.3, -1), torch.log_softmax(t.double() / 1.3, -1),
                                       beta), labels, reduction, 3)
        assert_agrees_like_peer(ours, theirs, exact)
        assert_agrees_like_peer(_grad(ours, s), _grad(theirs, s), _grad(exact, leaf))


# --- on-policy top-k / tail bucket ------------------------------------------------------------

def _topk_definition(student, ids, logprobs, labels, beta, temperature, add_tail, reduction):
    """TRL's server/async top-k path written out in float64 with explicit masks."""
    log_q = torch.log_softmax(student.double() / temperature, -1)
    support = (ids >= 0) & (logprobs > -math.inf)
    s = torch.where(support, log_q.gather(-1, ids.clamp_min(0)), -math.inf)
    p = torch.where(support, logprobs.double(), -math.inf)
    if add_tail:
        def tail(x):
            log_sum = torch.logsumexp(x, -1, keepdim=True).clamp(max=-1e-7)
            return torch.cat([x, torch.log(1 - log_sum.exp())], -1)
        s, p = tail(s), tail(p)
        support = torch.cat([support, torch.ones_like(support[..., :1])], -1)
    else:
        s = s - torch.logsumexp(s, -1, keepdim=True)
        p = p - torch.logsumexp(p, -1, keepdim=True)
    terms = torch.where(support, _jsd_terms(torch.where(support, s, -math.inf), torch.where(support, p, -math.inf),
                                            beta), 0.0)
    return _reduce(terms, labels, reduction, student.shape[0])


def _topk_case(B=3, T=6, V=1271, K=5, scale=30.0):
    student, teacher, labels = _logits_case(B, T, V, scale)
    teacher_log = torch.log_softmax(teacher, -1)
    ids = teacher_log.topk(K, -1).indices
    logprobs = teacher_log.gather(-1, ids)
    ids[0, 1, 3:] = -1                    # async-style padding
    logprobs[0, 1, 3:] = -math.inf
    logprobs[1, 2, 4:] = -math.inf        # server-style padding (id kept)
    return student, ids, logprobs, labels


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_topk_matches_definition(beta, add_tail, reduction):
    student, ids, logprobs, labels = _topk_case()
    student.requires_grad_(True)
    ours = topk_generalized_jsd_loss(student, ids, logprobs, labels, beta, 1.4, add_tail, reduction)
    leaf = student.detach().double().requires_grad_(True)
    ref = _topk_definition(leaf, ids, logprobs, labels, beta, 1.4, add_tail, reduction)
    assert ours.shape == ref.shape and rel_err(ours, ref) < 2e-5
    assert rel_err(_grad(ours, student), _grad(ref, leaf)) < 2e-5


def test_topk_num_items_and_all_ignored():
    student, ids, logprobs, labels = _topk_case(V=97)
    student.requires_grad_(True)
    ours = topk_generalized_jsd_loss(student, ids, logprobs, labels, 0.0, 1.0, True, num_items_in_batch=torch.tensor(11))
    ref = _topk_definition(student.detach(), ids, logprobs, labels, 0.0, 1.0, True, "sum") / 11
    assert rel_err(ours, ref) < 2e-5
    labels[:] = -100
    loss = topk_generalized_jsd_loss(student, ids, logprobs, labels, reduction="mean")
    assert loss.item() == 0.0 and not _grad(loss, student).any()


def test_topk_errors_are_named():
    student, ids, logprobs, labels = _topk_case(V=97)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        topk_generalized_jsd_loss(student, ids, logprobs[..., :4], labels)
    with pytest.raises(TypeError, match="teacher_topk_ids"):
        topk_generalized_jsd_loss(student, ids.float(), logprobs, labels)
    with pytest.raises(ValueError, match="support_mask"):
        topk_generalized_jsd_loss(student, ids, logprobs, labels, support_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="beta"):
        topk_generalized_jsd_loss(student, ids, logprobs, labels, beta=2.0)


@pytest.mark.skipif(TRL_SKIP is not None, reason=str(TRL_SKIP))
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_matches_trl_itself(add_tail, beta):
    jsd_divergence, add_tail_bucket, reduce_loss = trl_functions(
        "experimental/server_distillation/server_distillation_trainer.py", "_jsd_divergence", "_add_tail_bucket",
        "ServerDistillationTrainer._reduce_divergence_loss")
    student, ids, logprobs, labels = _topk_case()
    student.requires_grad_(True)
    # TRL's own composition (as in _compute_server_forward_kl_loss / the async _jsd_loss_chunk)
    valid = (ids != -1) & (logprobs > -math.inf)
    s = torch.where(valid, torch.log_softmax(student / 1.4, -1).gather(-1, ids.clamp_min(0)), -math.inf)
    p = torch.where(valid, logprobs, -math.inf)
    if add_tail:
        (s, support), (p, _) = add_tail_bucket(s, valid), add_tail_bucket(p, valid)
    else:
        s, p, support = s - torch.logsumexp(s, -1, keepdim=True), p - torch.logsumexp(p, -1, keepdim=True), valid
    with _no_check():
        theirs = reduce_loss(jsd_divergence(s, p, beta, support), labels != -100, "batchmean")
    ours = topk_generalized_jsd_loss(student, ids, logprobs, labels, beta, 1.4, add_tail)
    leaf = student.detach().double().requires_grad_(True)
    exact = _topk_definition(leaf, ids, logprobs, labels, beta, 1.4, add_tail, "batchmean")
    assert_agrees_like_peer(ours, theirs, exact)
    assert_agrees_like_peer(_grad(ours, student), _grad(theirs, student), _grad(exact, leaf))
