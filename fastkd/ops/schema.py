"""One options dataclass ↔ the primitive arguments of a torch.library schema.

A custom op takes its tensors, then the fields of its options dataclass in order; ``define``
writes that schema, ``flatten`` and ``unflatten`` convert, ``no_gradients`` gives the Nones an
autograd backward returns for them. Nothing here counts arguments by hand.
"""

import functools
from dataclasses import fields

import torch

_SCHEMA_TYPES = {str: "str", float: "float", int: "int", bool: "bool"}


def _options_schema(options_class):
    return ", ".join(f"{_SCHEMA_TYPES[field.type]} {field.name}" for field in fields(options_class))


def define(name, tensors, options_class, returns, extra=""):
    """A custom op ``fastkd::name`` taking ``tensors`` (schema text), the options' fields, then
    ``extra`` (more schema text), returning ``returns``. Use as a decorator on its implementation,
    which runs with autocast off: the op decides its own dtypes."""
    arguments = ", ".join(part for part in (tensors, _options_schema(options_class), extra) if part)
    op = torch.library.custom_op(f"fastkd::{name}", mutates_args=(), schema=f"({arguments}) -> {returns}")
    return lambda implementation: op(_without_autocast(implementation))


def _without_autocast(implementation):
    # Autocast passes a custom op through unchanged but stays on for the torch calls inside it: a
    # matmul there would silently run in bf16 and mismatch the buffers the op allocated.
    @functools.wraps(implementation)
    def run(*args):
        device_type = next(arg.device.type for arg in args if isinstance(arg, torch.Tensor))
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return implementation(*args)
        return implementation(*args)

    return run


def flatten(options):
    return tuple(getattr(options, field.name) for field in fields(options))


def unflatten(options_class, values):
    """The options dataclass from the first len(fields) of ``values``; returns (options, the rest)."""
    count = len(fields(options_class))
    return options_class(*values[:count]), tuple(values[count:])


def no_gradients(options_class):
    return (None,) * len(fields(options_class))
