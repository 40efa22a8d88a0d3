"""Triton launches on the tensors' GPU.

A Triton launch goes to the *current* CUDA device, not to the device of its arguments: with tensors
on cuda:1 while cuda:0 is current, the kernel would run on cuda:0 against cuda:1 pointers. Every
Triton launcher of fastkd is wrapped in ``on_tensor_device``, which makes the device of its first
tensor argument current for the call (as flash-attention's Triton cross-entropy does with
``torch.cuda.device(logits.device)``). All of a launcher's tensors are on one device (the public
functions check it). CPU tensors (the interpreter) need no guard.
"""

import functools

import torch


def _first_tensor(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def on_tensor_device(launcher):
    """Decorates a launcher so that it runs with its tensors' CUDA device current."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        tensor = _first_tensor(args, kwargs)
        if tensor is None or tensor.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(*args, **kwargs)

    return launch
