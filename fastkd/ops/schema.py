"""One options dataclass ↔ the primitive arguments of a torch.library schema.

A custom op takes its tensors, then the fields of its options dataclass in order (a field that is
itself a dataclass, such as the DivergenceSpec, is expanded in place); ``define`` writes that
schema, ``flatten`` and ``unflatten`` convert, ``no_gradients`` gives the Nones an autograd
backward returns for them. Nothing here counts arguments by hand.
"""

import functools
from dataclasses import fields, is_dataclass

import torch

_SCHEMA_TYPES = {str: "str", float: "float", int: "int", bool: "bool"}


def _leaves(options_class, prefix=""):
    """(schema name, Python type) of every primitive field, nested dataclasses flattened in order."""
    for field in fields(options_class):
        if is_dataclass(field.type):
            yield from _leaves(field.type, f"{prefix}{field.name}_")
        else:
            yield f"{prefix}{field.name}", field.type


def _options_schema(options_class):
    return ", ".join(f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in _leaves(options_class))


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
    """The primitive fields of ``options`` in schema order (nested dataclasses expanded)."""
    values = []
    for field in fields(options):
        value = getattr(options, field.name)
        values.extend(flatten(value) if is_dataclass(field.type) else (value,))
    return tuple(values)


def unflatten(options_class, values):
    """The options dataclass from the leading primitive ``values``; returns (options, the rest)."""
    values = tuple(values)
    arguments = []
    for field in fields(options_class):
        if is_dataclass(field.type):
            value, values = unflatten(field.type, values)
        else:
            value, values = values[0], values[1:]
        arguments.append(value)
    return options_class(*arguments), values


def no_gradients(options_class):
    return (None,) * sum(1 for _ in _leaves(options_class))
