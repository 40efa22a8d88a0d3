"""The peers' own code, where it is installed (requirements-peers.txt, installed with --no-deps).

torchtune's and TRL's package ``__init__`` files import their whole training stacks (datasets,
transformers, torchao, …) that a --no-deps install does not bring. The losses themselves need
only torch, so they are taken from the installed files directly: torchtune's ``kd_losses.py``
is loaded as a module on its own, and TRL's loss functions are compiled from their source in
the installed wheel (the function nodes alone, with torch in scope). Liger imports normally.
Every loader returns None when the peer is missing; ``skip_reason`` says why.
"""

import ast
import importlib.util
import pathlib

import torch
import torch.nn.functional as F

VERSIONS = {"liger_kernel": "0.8.5", "trl": "1.16.0", "torchtune": "0.6.1"}


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # locates a top-level package without importing it
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent


def installed_version(name):
    try:
        from importlib.metadata import version
        return version(name.replace("_", "-"))
    except Exception:  # noqa: BLE001 - any failure means "not installed" here
        return None


def skip_reason(name):
    version = installed_version(name)
    if version is None:
        return f"{name} is not installed (pip install --no-deps -r requirements-peers.txt)"
    if version != VERSIONS[name]:
        return f"{name} {version} is installed; these comparisons are for {VERSIONS[name]}"
    return None


def torchtune_kd_losses():
    """torchtune.modules.loss.kd_losses, loaded from its file (it imports only torch)."""
    if skip_reason("torchtune"):
        return None
    path = _package_dir("torchtune") / "modules" / "loss" / "kd_losses.py"
    spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trl_functions(relative_path, *qualnames):
    """Functions (``name`` or ``Class.method``) of an installed TRL source file, compiled from their
    source with torch, F and math in scope, without their decorators (methods take ``self``
    explicitly; static methods become plain functions)."""
    if skip_reason("trl"):
        return None
    path = _package_dir("trl") / relative_path
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    item.decorator_list = []  # staticmethod, profiling wrappers: not needed here
                    found[f"{node.name}.{item.name}"] = item
    namespace = {"torch": torch, "F": F, "math": __import__("math")}
    module = ast.Module(body=[found[name] for name in qualnames], type_ignores=[])
    exec(compile(module, str(path), "exec"), namespace)  # noqa: S102 - the peer's installed code
    return [namespace[name.split(".")[-1]] for name in qualnames]
