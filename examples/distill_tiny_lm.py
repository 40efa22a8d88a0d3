"""End-to-end distillation of a tiny causal LM on a CPU: fastkd's fused loss next to the eager loss.

A synthetic language (a random sparse first-order Markov chain over V tokens) gives the models
something to learn. A teacher (``transformers.LlamaForCausalLM`` from a config: random
initialisation, fixed seed, no download) is fitted on it for a few dozen steps; then one student,
from one initialisation, is distilled twice on the same batches with the same optimiser:

    fastkd   fastkd.fused_linear_kd_loss(student.model(x) hidden states, student.lm_head.weight,
             teacher.model(x) hidden states, teacher.lm_head.weight, labels): the (N, V) logits
             of neither model are formed
    eager    student(x).logits and teacher(x).logits → log_softmax(logits / T) → the divergence per
             token, averaged over the tokens whose label is not -100 (what one writes by hand)

Per token, with p = softmax(teacher logits / T) and q = softmax(student logits / T):
forward_kl = Σ p·(log p − log q); reverse_kl = Σ q·(log q − log p); jsd = β·KL(p‖m) + (1−β)·KL(q‖m)
with m = β·p + (1−β)·q. The loss is the mean over tokens whose label is not -100 (the first
``prompt_len`` positions of every sequence, as prompts are in instruction distillation, and the
last, which has no next token).

Prints both loss curves, the students' agreement with the teacher on held-out sequences (top-1
match rate, mean KL(teacher ‖ student) at T = 1) and the peak memory of one distillation step
(teacher forward, student forward and backward) of each loss, measured in a fresh process as the
resident high-water mark (VmHWM) above the resident size before the step:

    PYTHONPATH=. python examples/distill_tiny_lm.py --steps 300 --plot docs/distill_tiny_lm.png
"""

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import fastkd

IGNORE_INDEX = -100
LOSS_KINDS = ("fastkd", "eager")


@dataclass(frozen=True)
class Config:
    """Sizes and hyper-parameters; the defaults run 300 steps of both losses in about a minute on 2 cores."""

    vocab: int = 2000  # not a power of two, as real vocabularies are not
    successors: int = 4  # tokens each token can be followed by in the synthetic language
    seq_len: int = 64
    batch: int = 16
    prompt_len: int = 8  # leading positions labelled -100
    teacher_hidden: int = 128
    teacher_layers: int = 2
    student_hidden: int = 64
    student_layers: int = 2
    teacher_steps: int = 60
    teacher_lr: float = 5e-3
    student_lr: float = 3e-3
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    eval_batches: int = 4
    seed: int = 0


# ---- the synthetic language -------------------------------------------------------------------

@dataclass(frozen=True)
class MarkovChain:
    """Token i is followed by ``successors[i, j]`` with probability ``probs[i, j]``: (V, k) each."""

    successors: torch.Tensor
    probs: torch.Tensor

    def entropy_rate(self):
        """Mean over tokens of the next-token entropy in nats: the cross-entropy a perfect model reaches
        (up to the bias of the uniform start, negligible over a sequence)."""
        return float(-(self.probs * self.probs.log()).sum(-1).mean())


def make_chain(config):
    generator = torch.Generator().manual_seed(config.seed)
    scores = torch.rand(config.vocab, config.vocab, generator=generator)
    successors = scores.topk(config.successors, dim=-1).indices  # k distinct random tokens per row
    # Peaked transition weights (softmax of scaled Gaussians): some successors are clearly likelier.
    probs = torch.softmax(2.0 * torch.randn(config.vocab, config.successors, generator=generator), -1)
    return MarkovChain(successors, probs)


def sample_batch(chain, config, seed):
    """(input_ids, labels), both (batch, seq_len) int64; one seed gives one batch, whoever asks."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [torch.randint(0, config.vocab, (config.batch,), generator=generator)]
    for _ in range(config.seq_len - 1):
        current = tokens[-1]
        choice = torch.multinomial(chain.probs[current], 1, generator=generator).squeeze(-1)
        tokens.append(chain.successors[current, choice])
    input_ids = torch.stack(tokens, dim=1)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, :config.prompt_len] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX  # the last position has no next token
    return input_ids, labels


def _batch_seed(config, step, held_out=False):
    # Training and held-out batches come from disjoint seed ranges.
    return config.seed * 1_000_003 + (10_000_000 if held_out else 0) + step


# ---- the models -------------------------------------------------------------------------------

def make_model(config, role, seed):
    """A LlamaForCausalLM of the role's size ("teacher" or "student"), randomly initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = config.teacher_hidden if role == "teacher" else config.student_hidden
    layers = config.teacher_layers if role == "teacher" else config.student_layers
    model_config = LlamaConfig(vocab_size=config.vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                               max_position_embeddings=config.seq_len, tie_word_embeddings=False,
                               attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config).float()


def fit_teacher(teacher, chain, config):
    """A few steps of next-token cross-entropy; returns the loss per step."""
    optimiser = torch.optim.AdamW(teacher.parameters(), lr=config.teacher_lr, weight_decay=0.0)
    losses = []
    teacher.train()
    for step in range(config.teacher_steps):
        input_ids, labels = sample_batch(chain, config, _batch_seed(config, -1 - step))
        logits = teacher(input_ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    teacher.eval()
    return losses


# ---- the two losses ---------------------------------------------------------------------------

def eager_divergence(student_logits, teacher_logits, labels, config):
    """Mean over tokens with label ≠ -100 of the per-token divergence (formulas in the module docstring),
    from full logits (…, V): the reference written with log_softmax."""
    log_q = F.log_softmax(student_logits.float() / config.temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / config.temperature, dim=-1)

    def kl(log_a, log_b):  # KL(a ‖ b) per token
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if config.divergence == "forward_kl":
        per_token = kl(log_p, log_q)
    elif config.divergence == "reverse_kl":
        per_token = kl(log_q, log_p)
    else:  # jsd, 0 < β < 1
        log_m = torch.logaddexp(log_p + math.log(config.beta), log_q + math.log1p(-config.beta))
        per_token = config.beta * kl(log_p, log_m) + (1 - config.beta) * kl(log_q, log_m)
    valid = labels != IGNORE_INDEX
    return torch.where(valid, per_token, 0.0).sum() / valid.sum().clamp_min(1)


def distillation_loss(kind, student, teacher, input_ids, labels, config):
    """One distillation loss of ``kind`` ("fastkd" or "eager"); the teacher runs without gradients."""
    if kind == "fastkd":
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids).last_hidden_state
        student_hidden = student.model(input_ids).last_hidden_state
        return fastkd.fused_linear_kd_loss(student_hidden, student.lm_head.weight, teacher_hidden,
                                           teacher.lm_head.weight, labels, divergence=config.divergence,
                                           temperature=config.temperature,
                                           beta=config.beta if config.divergence == "jsd" else None)
    if kind == "eager":
        with torch.no_grad():
            teacher_logits = teacher(input_ids).logits
        return eager_divergence(student(input_ids).logits, teacher_logits, labels, config)
    raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")


def distil(kind, teacher, student_init, chain, config, steps):
    """Distils a copy of ``student_init`` for ``steps`` steps; returns (student, losses, seconds)."""
    student = copy.deepcopy(student_init)
    student.train()
    optimiser = torch.optim.AdamW(student.parameters(), lr=config.student_lr, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        input_ids, labels = sample_batch(chain, config, _batch_seed(config, step))
        loss = distillation_loss(kind, student, teacher, input_ids, labels, config)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))  # one host read per step, for the printed curve
    student.eval()
    return student, losses, time.perf_counter() - start


@torch.no_grad()
def agreement(student, teacher, chain, config):
    """(top-1 match rate, mean KL(teacher ‖ student) at T = 1) over held-out tokens with label ≠ -100."""
    matches = kl_sum = count = 0.0
    for index in range(config.eval_batches):
        input_ids, labels = sample_batch(chain, config, _batch_seed(config, index, held_out=True))
        valid = labels != IGNORE_INDEX
        student_logits, teacher_logits = student(input_ids).logits[valid], teacher(input_ids).logits[valid]
        matches += float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
        log_p, log_q = F.log_softmax(teacher_logits, -1), F.log_softmax(student_logits, -1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        count += float(valid.sum())
    return matches / count, kl_sum / count


@torch.no_grad()
def held_out_cross_entropy(model, chain, config):
    """Next-token cross-entropy on the held-out tokens (nats), to set against the chain's entropy rate."""
    total = count = 0.0
    for index in range(config.eval_batches):
        input_ids, labels = sample_batch(chain, config, _batch_seed(config, index, held_out=True))
        logits = model(input_ids).logits
        total += float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        count += float((labels != IGNORE_INDEX).sum())
    return total / count


# ---- peak memory of one step, in a fresh process ------------------------------------------------

def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"{field} missing from /proc/self/status")


def _memory_probe(kind, config):
    """Prints the extra resident bytes of one distillation step: VmHWM after it − VmRSS before it.

    VmHWM only grows, hence a process of its own; the warm-up step on a 1 × 8 batch keeps lazy
    initialisation (thread pools, kernel caches) out of the measurement.
    """
    chain = make_chain(config)
    teacher, student = make_model(config, "teacher", config.seed), make_model(config, "student", config.seed + 1)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    tiny = replace(config, batch=1, seq_len=8, prompt_len=2)
    distillation_loss(kind, student, teacher, *sample_batch(chain, tiny, 0), tiny).backward()
    student.zero_grad(set_to_none=False)  # gradients of the parameters exist before, as in training
    input_ids, labels = sample_batch(chain, config, _batch_seed(config, 0))
    before = _proc_status_bytes("VmRSS")
    distillation_loss(kind, student, teacher, input_ids, labels, config).backward()
    print(json.dumps({"extra_bytes": max(_proc_status_bytes("VmHWM") - before, 0)}))


def peak_step_memory(kind, config):
    """Extra resident bytes of one distillation step of ``kind`` (CPU, Linux), or None with the reason."""
    if not os.path.exists("/proc/self/status"):
        return None, "no /proc/self/status (not Linux)"
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", kind,
               "--config", json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return None, (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"], ""


# ---- the run ----------------------------------------------------------------------------------

def run(config, steps, measure_memory=True):
    """Fits the teacher, distils the student with each loss; returns a dict of everything printed."""
    chain = make_chain(config)
    teacher = make_model(config, "teacher", config.seed)
    teacher_losses = fit_teacher(teacher, chain, config)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student_init = make_model(config, "student", config.seed + 1)
    result = {"config": asdict(config), "steps": steps, "entropy_rate": chain.entropy_rate(),
              "teacher_losses": teacher_losses, "teacher_cross_entropy": held_out_cross_entropy(teacher, chain, config),
              "init_agreement": agreement(student_init, teacher, chain, config), "runs": {}}
    for kind in LOSS_KINDS:
        student, losses, seconds = distil(kind, teacher, student_init, chain, config, steps)
        result["runs"][kind] = {"losses": losses, "seconds": seconds,
                                "agreement": agreement(student, teacher, chain, config)}
        if measure_memory:
            result["runs"][kind]["peak_bytes"], result["runs"][kind]["peak_note"] = peak_step_memory(kind, config)
    return result


def max_relative_gap(a, b):
    """max over steps of |a − b| / |b|: how far two loss curves are apart, step by step."""
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


def report(result):
    config, runs = result["config"], result["runs"]
    print(f"synthetic language: V={config['vocab']}, {config['successors']} successors per token, entropy rate "
          f"{result['entropy_rate']:.3f} nats; teacher fitted {config['teacher_steps']} steps: held-out "
          f"cross-entropy {result['teacher_cross_entropy']:.3f} nats (uniform: {math.log(config['vocab']):.3f})")
    print(f"distillation: {config['divergence']}, T={config['temperature']}, {result['steps']} steps of "
          f"{config['batch']}×{config['seq_len']} tokens, AdamW lr {config['student_lr']}")
    print(f"{'step':>6} {'fastkd':>12} {'eager':>12} {'rel. gap':>10}")
    fast, eager = runs["fastkd"]["losses"], runs["eager"]["losses"]
    every = max(1, len(fast) // 20)
    for step in sorted(set(range(0, len(fast), every)) | {len(fast) - 1}):
        gap = abs(fast[step] - eager[step]) / eager[step]
        print(f"{step:>6} {fast[step]:>12.6f} {eager[step]:>12.6f} {gap:>10.1e}")
    print(f"largest step-by-step relative gap between the curves: {max_relative_gap(fast, eager):.1e}")
    top1, kl = result["init_agreement"]
    print(f"student before distillation: top-1 agreement {top1:.1%}, KL(teacher‖student) {kl:.4f}")
    for kind, run_ in runs.items():
        top1, kl = run_["agreement"]
        memory = (f"{run_['peak_bytes'] / 2 ** 20:.1f} MiB" if run_.get("peak_bytes") is not None
                  else f"n/a ({run_.get('peak_note') or 'not measured'})")
        print(f"{kind:>6}: top-1 agreement {top1:.1%}, KL(teacher‖student) {kl:.4f}; "
              f"{1000 * run_['seconds'] / result['steps']:.1f} ms/step; peak extra memory of one step {memory}")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fast, eager = result["runs"]["fastkd"]["losses"], result["runs"]["eager"]["losses"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(eager, label="eager (logits → log_softmax)", linewidth=3, alpha=0.4)
    left.plot(fast, label="fastkd.fused_linear_kd_loss", linewidth=1)
    left.set(xlabel="step", ylabel=f"{result['config']['divergence']} loss", yscale="log",
             title="distillation loss")
    left.legend()
    gaps = [abs(x - y) / y for x, y in zip(fast, eager)]
    floor = 1e-9  # equal values (a gap of 0) are drawn here: a log axis has no 0
    right.plot(range(len(gaps)), [max(g, floor) for g in gaps], ".", markersize=3)
    right.set(xlabel="step", ylabel="|fastkd − eager| / eager", yscale="log", ylim=(floor / 2, None),
              title=f"gap between the curves (0 drawn at {floor:g})")
    config = result["config"]
    figure.suptitle(f"tiny Llama student (H={config['student_hidden']}) from a teacher (H={config['teacher_hidden']}), "
                    f"V={config['vocab']}, {config['batch']}×{config['seq_len']} tokens/step, CPU", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="distillation steps of each loss")
    parser.add_argument("--plot", metavar="PATH", help="write the loss curves as an image (matplotlib)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.5, help="jsd's β, 0 < β < 1")
    parser.add_argument("--teacher-steps", type=int, default=Config.teacher_steps)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    parser.add_argument("--memory-probe", choices=LOSS_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        _memory_probe(args.memory_probe, Config(**json.loads(args.config)))
        return
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be positive, got {args.temperature}")
    if args.divergence == "jsd" and not 0 < args.beta < 1:
        parser.error(f"--beta must lie strictly between 0 and 1 for jsd, got {args.beta}")
    config = Config(seed=args.seed, divergence=args.divergence, temperature=args.temperature, beta=args.beta,
                    teacher_steps=args.teacher_steps)
    result = run(config, args.steps, measure_memory=not args.no_memory)
    report(result)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
