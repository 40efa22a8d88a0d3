"""Which backends exist on this machine, and which one runs a given call.

Availability is probed once, at import, so that choosing a backend inside a ``torch.compile``d
function is plain dictionary work. The choice for ``backend="auto"`` lives in ``AUTO_PREFERENCE``.
"""

import importlib
import os
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton", "cpu", "cuda")

# backend="auto": fastest first, per device type (docs/perf-notes.md). CPU: the C++ kernels beat the
# torch backend and eager PyTorch at N=2048, V=32000 fp32 on a 2-core EPYC, fwd+bwd median
# (2026-11-22, same run): forward_kl 175 ms vs 505 ms (torch) vs 905 ms (eager); jsd 368 vs 1120
# vs 2885 ms. The CUDA C++ kernels have not been timed on a GPU yet, so Triton stays first there.
AUTO_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = {"torch": _FLOATS + (torch.float64,), "triton": _FLOATS, "cpu": _FLOATS, "cuda": _FLOATS}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, on which device types, and why (not)."""

    name: str
    available: bool
    devices: tuple
    reason: str


def _probe_triton():
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything
        return BackendStatus("triton", False, (), f"triton is not importable ({exc})")
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        devices.append("cpu")
    if not devices:
        return BackendStatus("triton", False, (), f"triton {triton.__version__} is installed but no CUDA "
                             "device is visible (TRITON_INTERPRET=1 runs its kernels on the CPU interpreter)")
    where = " and ".join("the CPU interpreter" if d == "cpu" else "CUDA" for d in devices)
    return BackendStatus("triton", True, tuple(devices), f"triton {triton.__version__} on {where}")


def _probe_native(name):
    try:
        ext = importlib.import_module("fastkd._C")
    except Exception as exc:
        return BackendStatus(name, False, (), f"the compiled extension fastkd._C is not built ({exc})")
    if not hasattr(ext, f"kd_rows_forward_{name}"):
        return BackendStatus(name, False, (), "fastkd._C is built but is too old to hold the kd_loss kernels "
                             "(rebuild it: pip install --no-build-isolation -e .)")
    if name == "cpu":
        return BackendStatus("cpu", True, ("cpu",), "C++ kernels of fastkd._C (OpenMP)")
    if not ext.with_cuda:
        return BackendStatus("cuda", False, (), "fastkd._C was built without CUDA (no nvcc at build time, "
                             "or FASTKD_BUILD_CUDA=0)")
    if torch.version.cuda is None or not torch.cuda.is_available():
        return BackendStatus("cuda", False, (), "fastkd._C has CUDA kernels but PyTorch sees no CUDA device")
    return BackendStatus("cuda", True, ("cuda",), "CUDA kernels of fastkd._C")


def _probe_all():
    return {
        "torch": BackendStatus("torch", True, ("cpu", "cuda"), "pure PyTorch, any device"),
        "triton": _probe_triton(),
        "cpu": _probe_native("cpu"),
        "cuda": _probe_native("cuda"),
    }


_STATUS = _probe_all()


def available_backends():
    """Returns {backend name: BackendStatus} for every backend, usable or not, with the reason."""
    return dict(_STATUS)


def _supports(name, dtypes):
    return all(dtype in SUPPORTED_DTYPES[name] for dtype in dtypes)


def _usable_for(device_type, dtypes):
    return [name for name in BACKENDS
            if _STATUS[name].available and device_type in _STATUS[name].devices and _supports(name, dtypes)]


def resolve_backend(requested, device, dtypes):
    """Maps ``backend=`` (a name or "auto") to the backend that runs on ``device`` for inputs of
    the given ``dtypes`` (a tuple: student and teacher may differ).

    Raises ValueError naming the backends that would work when the request cannot be honoured.
    """
    if not isinstance(requested, str) or requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {requested!r}")
    usable = _usable_for(device.type, dtypes)
    dtype_names = "/".join(str(d).replace("torch.", "") for d in dtypes)
    if requested == "auto":
        for name in AUTO_PREFERENCE.get(device.type, ("torch",)):
            if name in usable:
                return name
        if usable:
            return usable[0]
        raise ValueError(f"no fastkd backend runs on device {device.type!r} for {dtype_names} inputs")
    status = _STATUS[requested]
    if not status.available:
        raise ValueError(f"backend={requested!r} is not available: {status.reason}. "
                         f"Usable here for {device.type} {dtype_names}: {usable}")
    if device.type not in status.devices:
        raise ValueError(f"backend={requested!r} does not run on device {device.type!r} here "
                         f"(it runs on {list(status.devices)}). Usable for {device.type}: {usable}")
    if not _supports(requested, dtypes):
        raise ValueError(f"backend={requested!r} does not support {dtype_names} inputs. "
                         f"Usable for them: {usable}")
    return requested


# (backend, op family) → the module holding that family's launchers.
_LAUNCHERS = {
    ("torch", "kd_rows"): "fastkd.backends.torch_ref",
    ("torch", "kl_div"): "fastkd.backends.torch_ref",
    ("triton", "kd_rows"): "fastkd.backends.triton.logits",
    ("triton", "kl_div"): "fastkd.backends.triton.kl_div",
    ("cpu", "kd_rows"): "fastkd.backends.native_kd",
    ("cpu", "kl_div"): "fastkd.backends.native_kd",
    ("cuda", "kd_rows"): "fastkd.backends.native_kd",
    ("cuda", "kl_div"): "fastkd.backends.native_kd",
    ("torch", "ce"): "fastkd.backends.torch_ref",
    ("triton", "ce"): "fastkd.backends.triton.cross_entropy",
    ("torch", "sinkhorn"): "fastkd.backends.torch_sinkhorn",
    ("triton", "sinkhorn"): "fastkd.backends.triton.sinkhorn",
    ("cpu", "sinkhorn"): "fastkd.backends.native_sinkhorn",
    ("cuda", "sinkhorn"): "fastkd.backends.native_sinkhorn",
}


def launcher(name, family="kd_rows"):
    """The module holding a backend's launchers for an op family (``kd_rows``: ``kd_rows_forward``
    and ``kd_rows_backward``; ``kl_div``: ``kl_div_rows_forward`` and ``kl_div_rows_backward``;
    ``ce``: ``ce_rows_forward`` and ``ce_rows_backward``)."""
    try:
        return importlib.import_module(_LAUNCHERS[name, family])
    except KeyError:
        raise ValueError(f"backend {name!r} has no {family} kernels") from None
