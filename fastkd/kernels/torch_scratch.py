"""Reused buffers for the torch backend's chunked loops.

Each chunk of rows needs the same sequence of (rows × V) temporaries. Allocating them afresh per
chunk made the CPU path slower than eager PyTorch: every multi-MiB block is new memory from the
system, paid in page faults (~700,000 per call at N=2048, V=32000). ``Scratch`` creates each
buffer on the first chunk and hands the same ones out, in the same order, for every later chunk.
"""

import torch


class Scratch:
    """``scratch(like, dtype=None)`` → an uninitialised tensor of ``like``'s shape (and dtype unless
    given); ``scratch.next_chunk()`` makes every buffer available again. Buffers handed out within
    one chunk never alias each other."""

    def __init__(self):
        self._buffers = []
        self._taken = 0

    def next_chunk(self):
        self._taken = 0

    def __call__(self, like, dtype=None):
        dtype = like.dtype if dtype is None else dtype
        index = self._taken
        self._taken += 1
        if index == len(self._buffers):
            self._buffers.append(torch.empty(like.numel(), dtype=dtype, device=like.device))
        buffer = self._buffers[index]
        if buffer.dtype != dtype or buffer.numel() < like.numel() or buffer.device != like.device:
            buffer = self._buffers[index] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return buffer[:like.numel()].view(like.shape)
