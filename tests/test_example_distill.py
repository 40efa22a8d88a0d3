"""examples/distill_tiny_lm.py on a few steps at small sizes: the fused loss and the eager loss give
the same loss curve step by step, the loss falls, and at the first step both losses and the student's
gradients match the divergence computed here in float64 from the models' logits."""

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the example builds its models with transformers")

EXAMPLE_PATH = Path(__file__).resolve().parent.parent / "examples" / "distill_tiny_lm.py"
STEPS = 20


def _load_example():
    spec = importlib.util.spec_from_file_location("distill_tiny_lm", EXAMPLE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def _config(**options):
    # V not a power of two; prompts of 5 ignored positions; the teacher fitted briefly.
    return example.Config(vocab=1003, seq_len=24, batch=6, prompt_len=5, teacher_hidden=64, student_hidden=32,
                          teacher_steps=8, **options)


def _models(config):
    chain = example.make_chain(config)
    teacher = example.make_model(config, "teacher", config.seed)
    example.fit_teacher(teacher, chain, config)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return chain, teacher, example.make_model(config, "student", config.seed + 1)


def _float64_divergence(student_logits, teacher_logits, labels, divergence, temperature, beta):
    """Mean over tokens with label ≠ -100 of the divergence, in float64 (written for the test)."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        rows = (p * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        rows = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    valid = labels != -100
    return rows[valid].sum() / valid.sum()


CASES = [dict(divergence="forward_kl"), dict(divergence="reverse_kl", temperature=2.0),
         dict(divergence="jsd", beta=0.3)]


@pytest.mark.parametrize("options", CASES, ids=lambda o: o["divergence"])
def test_loss_curves_agree_step_by_step(options):
    config = _config(**options)
    chain, teacher, student_init = _models(config)
    curves = {kind: example.distil(kind, teacher, student_init, chain, config, STEPS)[1] for kind in example.LOSS_KINDS}
    fused, eager = curves["fastkd"], curves["eager"]
    assert len(fused) == len(eager) == STEPS
    assert all(math.isfinite(x) for x in fused + eager)
    assert example.max_relative_gap(fused, eager) <= 1e-4, list(zip(fused, eager))
    assert sum(fused[-5:]) / 5 < 0.8 * fused[0], fused  # the student learns from the teacher


@pytest.mark.parametrize("options", CASES, ids=lambda o: o["divergence"])
def test_first_step_matches_float64(options):
    config = _config(**options)
    chain, teacher, student = _models(config)
    input_ids, labels = example.sample_batch(chain, config, 123)
    assert (labels == -100).any() and (labels != -100).any()

    # The float64 reference: both models in float64, the divergence from their full logits.
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    expected = _float64_divergence(student64(input_ids).logits, teacher64(input_ids).logits, labels,
                                   config.divergence, config.temperature, config.beta)
    expected.backward()
    expected = float(expected.detach())
    names = ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight")
    expected_grads = {name: parameter.grad for name, parameter in student64.named_parameters() if name in names}

    for kind in example.LOSS_KINDS:
        model = copy.deepcopy(student)
        loss = example.distillation_loss(kind, model, teacher, input_ids, labels, config)
        loss.backward()
        assert abs(float(loss.detach()) - expected) <= 1e-5 * abs(expected), kind
        grads = dict(model.named_parameters())
        for name in names:
            error = (grads[name].grad.double() - expected_grads[name]).norm() / expected_grads[name].norm()
            assert error <= 1e-4, (kind, name, float(error))


def test_unknown_loss_kind_is_named():
    config = _config()
    chain, teacher, student = _models(config)
    with pytest.raises(ValueError, match="kind"):
        example.distillation_loss("liger", student, teacher, *example.sample_batch(chain, config, 0), config)
