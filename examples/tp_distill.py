"""Vocab-parallel distillation: each rank holds a slice of the student's and the teacher's lm_head
(column-parallel, by vocabulary rows). Two forms, both giving the loss over the whole vocabulary
by exchanging per-row statistics:

  * fastkd.kd_loss(..., process_group=): this rank computes its slice of the logits itself;
  * fastkd.fused_linear_kd_loss(..., process_group=): from the hidden states and this rank's lm_head
    rows, never forming the logits (here with the hard-label term too).

    torchrun --nproc-per-node 2 examples/tp_distill.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/tp_distill.py --cuda     # GPUs, nccl

Every rank builds the same full weights from one seed, so the script can also compute the
one-process loss on the full logits and print both.
"""

import argparse
import os

import torch
import torch.distributed as dist

import fastkd


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="run on this rank's GPU with nccl")
    parser.add_argument("--vocab", type=int, default=32003, help="V; need not divide by the world size")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--divergence", default="jsd", choices=fastkd.DIVERGENCES)
    args = parser.parse_args()

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # One seed on every rank: the same hidden states (replicated, as tensor parallelism has them)
    # and the same full lm_heads, of which each rank keeps its contiguous block of rows.
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device)
    teacher_hidden = torch.randn(args.tokens, args.hidden, generator=generator).to(device)
    student_head = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden ** 0.5).to(device)
    teacher_head = (torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden ** 0.5).to(device)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=generator).to(device)
    labels[::7] = -100  # e.g. prompt tokens

    sizes = [args.vocab // world + (1 if r < args.vocab % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    student_shard = student_head[rows].clone().requires_grad_(True)

    options = dict(divergence=args.divergence, temperature=2.0)
    tp_loss = fastkd.kd_loss(student_hidden @ student_shard.t(), teacher_hidden @ teacher_head[rows].t(), labels,
                             process_group=dist.group.WORLD, **options)
    tp_loss.backward()

    full_head = student_head.clone().requires_grad_(True)
    one_loss = fastkd.kd_loss(student_hidden @ full_head.t(), teacher_hidden @ teacher_head.t(), labels, **options)
    one_loss.backward()
    expected = full_head.grad[rows]
    grad_error = (student_shard.grad - expected).norm() / expected.norm()

    # The fused form: hidden states and this rank's lm_head rows in, no logits formed. grad_hidden
    # comes back summed over the group (a column-parallel lm_head's input gradient).
    fused_options = dict(options, hard_weight=0.5)
    hidden = student_hidden.clone().requires_grad_(True)
    fused_shard = student_head[rows].clone().requires_grad_(True)
    # vocab_size (the whole vocabulary, known alike on every rank) sizes the token blocks for the
    # memory budget; return_entropy gives the student's entropy over the whole vocabulary.
    fused_parts = fastkd.fused_linear_kd_loss(hidden, fused_shard, teacher_hidden, teacher_head[rows], labels,
                                              process_group=dist.group.WORLD, vocab_size=args.vocab,
                                              return_entropy=True, **fused_options)
    fused_tp = fused_parts.loss
    fused_tp.backward()
    full_hidden, fused_full = student_hidden.clone().requires_grad_(True), student_head.clone().requires_grad_(True)
    fused_one = fastkd.fused_linear_kd_loss(full_hidden, fused_full, teacher_hidden, teacher_head, labels,
                                            **fused_options)
    fused_one.backward()
    fused_error = max((fused_shard.grad - fused_full.grad[rows]).norm() / fused_full.grad[rows].norm(),
                      (hidden.grad - full_hidden.grad).norm() / full_hidden.grad.norm())

    line = (f"rank {rank}/{world}: vocab rows [{rows.start}, {rows.stop}) of {args.vocab}, {args.divergence}: "
            f"TP loss {tp_loss.item():.9f}  one-process loss {one_loss.item():.9f}  "
            f"grad of this lm_head shard vs its rows of the one-process grad: rel. error {grad_error.item():.1e}\n"
            f"    fused (+ hard CE): TP loss {fused_tp.item():.9f}  one-process loss {fused_one.item():.9f}  "
            f"grads (lm_head rows, hidden) rel. error {fused_error.item():.1e}, "
            f"mean student entropy {fused_parts.entropy[labels != -100].mean().item():.4f}")
    for turn in range(world):  # print in rank order
        if turn == rank:
            print(line, flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
