"""Finds fastkd's Triton kernels and records the launches its launchers make, without a GPU.

Kernels: every ``@triton.jit`` function whose name ends in ``_kernel``, defined in a module under
``fastkd.kernels`` (helpers without the suffix are inlined into kernels and compiled with them).
Launches: each kernel's ``run`` (what ``kernel[grid](...)`` calls) is replaced by a recorder for
the duration of a ``recording()`` block, so a launcher called on meta tensors (shapes, strides and
dtypes, no storage) runs its own config code and hands over exactly the arguments, constexprs and
``num_warps`` it would launch with.
"""

import contextlib
import importlib
import pkgutil
from dataclasses import dataclass

import torch
from triton.runtime.jit import JITFunction

PACKAGE = "fastkd.kernels"


def discover(package=PACKAGE):
    """{"module:name": JITFunction} of every ``*_kernel`` defined in the package's modules."""
    root = importlib.import_module(package)
    kernels = {}
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.fn.__module__ == info.name:
                kernels[f"{info.name}:{name}"] = value
    return dict(sorted(kernels.items()))


def qualified_name(kernel):
    return f"{kernel.fn.__module__}:{kernel.fn.__name__}"


@dataclass(frozen=True)
class Argument:
    """A tensor argument as Triton's specialisation sees it: its dtype and its address. Memory from
    PyTorch's allocator is aligned (≥ 256 bytes), so the address is the view's offset into it."""

    dtype: torch.dtype
    offset_bytes: int

    def data_ptr(self):
        return self.offset_bytes


@dataclass(frozen=True)
class Launch:
    kernel: str  # "module:name"
    args: tuple  # tensors as Argument, the rest as passed
    kwargs: tuple  # sorted (name, value) pairs: constexprs and launch options


def _as_argument(value):
    if isinstance(value, torch.Tensor):
        return Argument(value.dtype, value.storage_offset() * value.element_size())
    return value


@contextlib.contextmanager
def recording(kernels):
    """Within the block, launching any of ``kernels`` appends a Launch to the yielded list instead."""
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(qualified_name(kernel), tuple(_as_argument(a) for a in args),
                                   tuple(sorted(kwargs.items()))))
        return run

    for kernel in kernels.values():
        kernel.run = recorder(kernel)  # an instance attribute shadows JITFunction.run
    try:
        yield launches
    finally:
        for kernel in kernels.values():
            del kernel.run
