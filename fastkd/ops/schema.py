"""One options dataclass ↔ the primitive arguments of a torch.library schema.

A custom op takes its tensors, then the fields of its options dataclass in order; ``define``
writes that schema, ``flatten`` and ``unflatten`` convert, ``no_gradients`` gives the Nones an
autograd backward returns for them. Nothing here counts arguments by hand.
"""

from dataclasses import fields

import torch

_SCHEMA_TYPES = {str: "str", float: "float", int: "int", bool: "bool"}


def _options_schema(options_class):
    return ", ".join(f"{_SCHEMA_TYPES[field.type]} {field.name}" for field in fields(options_class))


def define(name, tensors, options_class, returns, extra=""):
    """A custom op ``fastkd::name`` taking ``tensors`` (schema text), the options' fields, then
    ``extra`` (more schema text), returning ``returns``. Use as a decorator on its implementation."""
    arguments = ", ".join(part for part in (tensors, _options_schema(options_class), extra) if part)
    return torch.library.custom_op(f"fastkd::{name}", mutates_args=(), schema=f"({arguments}) -> {returns}")


def flatten(options):
    return tuple(getattr(options, field.name) for field in fields(options))


def unflatten(options_class, values):
    """The options dataclass from the first len(fields) of ``values``; returns (options, the rest)."""
    count = len(fields(options_class))
    return options_class(*values[:count]), tuple(values[count:])


def no_gradients(options_class):
    return (None,) * len(fields(options_class))
