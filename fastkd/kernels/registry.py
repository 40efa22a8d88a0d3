"""The capability registry: the one place that decides which backend runs an op.

Each row says that a backend implements an op family on some device types and dtypes, with a
priority and the module holding its launchers. ``backend="auto"`` takes the usable row of highest
priority; a backend asked for by name must have a usable row, or ``select`` raises one error that
lists what would serve. Rows that reuse another backend's code say so in their ``note``, which
``available_backends()`` shows: nothing falls back silently.

A row may also carry a per-call ``condition``: a function of its module that looks at the call
(a family's description of it, e.g. ``sinkhorn.contract.SinkhornCall``) and returns a
``Verdict``: whether the row serves the call at all (a backend asked for by name that does not
raises with the verdict's reason) and whether ``auto`` should take it (a row that serves but is
slower for small calls is passed over). ``auto`` passes over conditional rows when ``select`` is
given no call.

Availability (is Triton importable, is a CUDA device visible, is fastkd._C built and does it keep
the Python contract) is probed once, at import, so selecting inside a ``torch.compile``d function
is dictionary work.

Adding a backend or a family: write its module, add its rows below (and, for a new backend, its
probe in ``_probe``, or its entry in ``_PURE_PYTORCH``).
"""

import importlib
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

BACKENDS = ("torch", "triton", "native", "gemm")

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_ALL_FLOATS = _FLOATS + (torch.float64,)

FAMILIES = {
    "kd_rows": "divergences of temperature softmaxes from logits (kd_loss and the fused losses)",
    "kl_div": "torch.nn.KLDivLoss terms (compat.kl_div)",
    "ce": "hard-label cross-entropy rows (hard_weight of the fused losses)",
    "kd_rows_vocab_parallel": "kd_loss over a vocabulary split across a process group (process_group=)",
    "fused_linear_vocab_parallel": "the fused linear loss with lm_head rows split across a process group "
                                   "(fused_linear_kd_loss(process_group=))",
    "sparse_kd": "divergences against a top-k teacher",
    "sampled_kd": "cross-entropy against sampled teacher ids (random-sampling KD)",
    "sinkhorn": "the batched Sinkhorn forward",
    "sinkhorn_backward": "the Sinkhorn gradients",
    "topk": "a teacher's top-k log-probabilities from hidden states (fused_linear_topk)",
}


# Optional capabilities a call may need (DivergenceSpec.features) beyond its family's core.
FEATURES = frozenset({"dkd", "logit_scale", "softcap", "standardize"})


@dataclass(frozen=True)
class Implementation:
    """One row: ``backend`` implements ``family`` in ``module`` for these device types (None: every
    device PyTorch has), input dtypes and optional ``features``. ``backend="auto"`` picks the
    usable row of highest ``priority``; priority 0 rows run only when asked for by name."""

    family: str
    backend: str
    devices: Optional[tuple]
    dtypes: tuple
    priority: int
    module: str
    note: str = ""
    features: frozenset = frozenset()
    # Name of a function of ``module``: condition(call, auto) → Verdict, for rows that serve only
    # some calls ("" for rows that serve every call their devices and dtypes allow).
    condition: str = ""


class Verdict(NamedTuple):
    """A conditional row's answer for one call: ``serves`` (False: a backend asked for by name
    raises with ``reason``), ``auto`` (whether ``backend="auto"`` takes the row) and why."""

    serves: bool
    auto: bool
    reason: str


_LOGITS = "fastkd.kernels.logits"
_SINKHORN = "fastkd.kernels.sinkhorn"
_GEMM_NOTE = ("only for one (n, m) cost shared by every problem, with the cost's spread over eps inside the "
              "compute dtype's exponent range; auto takes it from B·n·m ≥ 2^15 and otherwise keeps the "
              "log-domain kernels")
_TORCH_SPARSE = "fastkd.kernels.sparse.torch"
_TORCH_SAMPLED = "fastkd.kernels.sampled.torch"

# Priorities (docs/perf-notes.md): on a GPU Triton first, the CUDA C++ kernels next (not yet timed
# on a GPU); on the CPU the C++ kernels beat the torch backend and eager PyTorch (2026-11-22:
# forward_kl 175 vs 505 vs 905 ms, jsd 368 vs 1120 vs 2885 ms at N=2048, V=32000 fp32, fwd+bwd).
# Triton on the CPU is its interpreter: for tests, never chosen by "auto".
ROWS = (
    # Every feature, as constexpr flags of the same kernels (kernels/logits/triton_transforms.py).
    Implementation("kd_rows", "triton", ("cuda",), _FLOATS, 30, f"{_LOGITS}.triton", features=FEATURES),
    Implementation("kd_rows", "triton", ("cpu",), _FLOATS, 0, f"{_LOGITS}.triton", features=FEATURES),
    # dkd: csrc/logits/dkd_cpu.cpp (one pass forward, one backward). The logit transforms: a template
    # flag (the plain path unchanged); standardize adds one moments pass forward and one write pass
    # backward (docs/csrc.md).
    Implementation("kd_rows", "native", ("cpu",), _FLOATS, 30, f"{_LOGITS}.native", features=FEATURES),
    # CUDA: the same features (csrc/logits/cuda.cu, dkd_cuda.cu), compiled and register-checked only.
    Implementation("kd_rows", "native", ("cuda",), _FLOATS, 20, f"{_LOGITS}.native", features=FEATURES,
                   note="the CUDA C++ kernels have not yet run on a GPU (dkd and the logit transforms included)"),
    Implementation("kd_rows", "torch", None, _ALL_FLOATS, 10, f"{_LOGITS}.torch", features=FEATURES),

    Implementation("kl_div", "triton", ("cuda",), _FLOATS, 30, f"{_LOGITS}.triton_kl_div"),
    Implementation("kl_div", "triton", ("cpu",), _FLOATS, 0, f"{_LOGITS}.triton_kl_div"),
    Implementation("kl_div", "native", ("cpu",), _FLOATS, 30, f"{_LOGITS}.native"),
    Implementation("kl_div", "native", ("cuda",), _FLOATS, 20, f"{_LOGITS}.native"),
    Implementation("kl_div", "torch", None, _ALL_FLOATS, 10, f"{_LOGITS}.torch"),

    Implementation("ce", "triton", ("cuda",), _FLOATS, 30, f"{_LOGITS}.triton_ce"),
    Implementation("ce", "triton", ("cpu",), _FLOATS, 0, f"{_LOGITS}.triton_ce"),
    Implementation("ce", "native", ("cpu",), _FLOATS, 30, f"{_LOGITS}.native_ce"),
    Implementation("ce", "native", ("cuda",), _FLOATS, 20, f"{_LOGITS}.native_ce"),
    Implementation("ce", "torch", None, _ALL_FLOATS, 10, f"{_LOGITS}.torch"),

    Implementation("kd_rows_vocab_parallel", "torch", None, _ALL_FLOATS, 10, "fastkd.distributed",
                   features=FEATURES),
    # The block GEMMs as on one device; the per-row statistics of each block all-reduced (torch ops).
    Implementation("fused_linear_vocab_parallel", "torch", None, _ALL_FLOATS, 10,
                   "fastkd.kernels.fused_linear.vocab_parallel", features=FEATURES),

    Implementation("sparse_kd", "torch", None, _ALL_FLOATS, 10, _TORCH_SPARSE),
    # sparse/triton.py: the tail mode's V passes (one read forward, one read + one write backward);
    # renormalize reads k logits per row (torch's gather/scatter, no V pass to fuse).
    Implementation("sparse_kd", "triton", ("cuda",), _FLOATS, 30, "fastkd.kernels.sparse.triton"),
    Implementation("sparse_kd", "triton", ("cpu",), _FLOATS, 0, "fastkd.kernels.sparse.triton"),
    # sparse/native.py: csrc/sparse/cpu.cpp, the same passes on the CPU (fwd+bwd 5.7-7.2x the torch
    # backend at N=1024, V=32000, k=64, docs/perf-notes.md 2026-12-07); no CUDA C++ kernel yet.
    Implementation("sparse_kd", "native", ("cpu",), _FLOATS, 30, "fastkd.kernels.sparse.native"),
    Implementation("sparse_kd", "native", ("cuda",), _FLOATS, 5, _TORCH_SPARSE,
                   note="the torch implementation: fastkd._C has no CUDA sparse-teacher kernel"),

    Implementation("sampled_kd", "torch", None, _ALL_FLOATS, 10, _TORCH_SAMPLED),
    Implementation("sampled_kd", "triton", ("cuda", "cpu"), _FLOATS, 5, _TORCH_SAMPLED,
                   note="the torch implementation: there is no Triton sampled-teacher kernel"),
    Implementation("sampled_kd", "native", ("cpu", "cuda"), _FLOATS, 5, _TORCH_SAMPLED,
                   note="the torch implementation: fastkd._C has no sampled-teacher kernel"),

    # The scaling-domain solver for a shared cost: one GEMM per half-iteration for the whole batch.
    # First wherever its condition (sinkhorn/gemm.py: shared cost, exact domain, large enough) holds:
    # on the CPU 1.6–21× the torch backend fwd+bwd from B·n·m = 2^15 (docs/perf-notes.md,
    # 2026-12-06); against Triton on a GPU not yet timed.
    Implementation("sinkhorn", "gemm", None, _ALL_FLOATS, 40, f"{_SINKHORN}.gemm", note=_GEMM_NOTE,
                   condition="condition"),
    Implementation("sinkhorn_backward", "gemm", None, _ALL_FLOATS, 40, f"{_SINKHORN}.gemm", note=_GEMM_NOTE,
                   condition="condition"),
    # The C++ Sinkhorn forward is opt-in: its CUDA part has not run on a GPU, and on the CPU it wins
    # on many small problems but not on the WKD fwd+bwd case (docs/perf-notes.md, 2026-11-22).
    Implementation("sinkhorn", "triton", ("cuda",), _FLOATS, 30, f"{_SINKHORN}.triton"),
    Implementation("sinkhorn", "triton", ("cpu",), _FLOATS, 0, f"{_SINKHORN}.triton"),
    Implementation("sinkhorn", "native", ("cpu", "cuda"), _FLOATS, 0, f"{_SINKHORN}.native"),
    Implementation("sinkhorn", "torch", None, _ALL_FLOATS, 10, f"{_SINKHORN}.torch"),
    Implementation("sinkhorn_backward", "triton", ("cuda",), _ALL_FLOATS, 30, f"{_SINKHORN}.triton"),
    Implementation("sinkhorn_backward", "triton", ("cpu",), _ALL_FLOATS, 0, f"{_SINKHORN}.triton"),
    Implementation("sinkhorn_backward", "native", ("cpu", "cuda"), _ALL_FLOATS, 0, f"{_SINKHORN}.torch",
                   note="the torch backward, on the compiled forward's fp32 outputs"),
    Implementation("sinkhorn_backward", "torch", None, _ALL_FLOATS, 10, f"{_SINKHORN}.torch"),

    # Block matmuls (the GEMM is most of the cost) with torch.topk and logsumexp per block.
    Implementation("topk", "torch", None, _ALL_FLOATS, 10, "fastkd.kernels.topk.torch"),
)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run a family here, on which device types (("*",): every device), and why (not)."""

    name: str
    available: bool
    devices: tuple
    reason: str
    features: tuple = ()  # the optional capabilities (FEATURES) its rows implement
    conditional: bool = False  # its rows serve only the calls their condition accepts (see the note)


# ---------------------------------------------------------------------------------------------
# Probes: (backend, device type) → (available, reason), once at import.
# ---------------------------------------------------------------------------------------------


def _probe_triton():
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything
        reason = f"triton is not importable ({exc})"
        return {"cuda": (False, reason), "cpu": (False, reason)}
    version = f"triton {triton.__version__}"
    cuda = (True, f"{version} on CUDA") if torch.cuda.is_available() else (
        False, f"{version} is installed but no CUDA device is visible")
    cpu = (True, f"{version} on its CPU interpreter (TRITON_INTERPRET=1): for tests") if (
        os.environ.get("TRITON_INTERPRET") == "1") else (
        False, "Triton runs on the CPU only under its interpreter (TRITON_INTERPRET=1)")
    return {"cuda": cuda, "cpu": cpu}


def _probe_native():
    try:
        native_ext = importlib.import_module("fastkd.kernels.native_ext")
        ext = native_ext.extension()
    except Exception as exc:
        reason = f"the compiled extension fastkd._C is not built ({exc})"
        return {"cuda": (False, reason), "cpu": (False, reason)}
    drift = native_ext.check_contract(ext, native_ext.expected_contract())
    if drift:
        reason = f"{drift}; rebuild it: pip install --no-build-isolation -e ."
        return {"cuda": (False, reason), "cpu": (False, reason)}
    cpu = (True, "C++ kernels of fastkd._C (OpenMP)")
    if not ext.with_cuda:
        cuda = (False, "fastkd._C was built without CUDA (no nvcc at build time, or FASTKD_BUILD_CUDA=0)")
    elif torch.version.cuda is None or not torch.cuda.is_available():
        cuda = (False, "fastkd._C has CUDA kernels but PyTorch sees no CUDA device")
    else:
        cuda = (True, "CUDA C++ kernels of fastkd._C")
    return {"cpu": cpu, "cuda": cuda}


def _probe():
    return {"triton": _probe_triton(), "native": _probe_native()}


_PROBED = _probe()
# Backends written in PyTorch alone: they run wherever PyTorch does, nothing to probe.
_PURE_PYTORCH = {"torch": "pure PyTorch", "gemm": "PyTorch matrix multiplies (BLAS on CPUs, cuBLAS on GPUs)"}


def _runs(backend, device_type):
    """(available, reason) of a backend on a device type."""
    if backend in _PURE_PYTORCH:
        return True, _PURE_PYTORCH[backend]
    return _PROBED[backend].get(device_type, (False, f"{backend} kernels do not run on {device_type!r} devices"))


def _serves(row, device_type, dtypes, features=frozenset()):
    return ((row.devices is None or device_type in row.devices) and all(d in row.dtypes for d in dtypes)
            and features <= row.features and _runs(row.backend, device_type)[0])


def _describe(dtypes):
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


# Highest priority first, so "auto" takes the first usable row (plain loops: Dynamo traces them).
_BY_PRIORITY = tuple(sorted(ROWS, key=lambda row: -row.priority))


def _usable(family, device_type, dtypes, features=frozenset()):
    return [row for row in _BY_PRIORITY if row.family == family and _serves(row, device_type, dtypes, features)]


def verdict(row, call, auto):
    """The row's Verdict for ``call`` (``auto``: asked by backend="auto"). A row without a
    condition serves every call; a conditional row given no call serves none."""
    if not row.condition:
        return Verdict(True, True, "")
    if call is None:
        return Verdict(False, False, f"{row.backend} serves only some {row.family} calls; this one was not described")
    return _CONDITIONS[row](call, auto)


def select(family, requested, device, dtypes, features=frozenset(), call=None):
    """The backend that runs ``family`` for inputs of ``dtypes`` on ``device`` with the optional
    ``features`` (registry.FEATURES): the highest-priority usable row for ``requested="auto"``
    (a conditional row only where its condition takes ``call``), else ``requested`` itself if it
    can serve (and its condition, if any, accepts ``call``).

    Raises ValueError naming what would serve when the request cannot be honoured.
    """
    if not isinstance(requested, str) or requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {requested!r}")
    usable = _usable(family, device.type, dtypes, features)
    names = sorted({row.backend for row in usable})
    if requested == "auto":
        for row in usable:
            if row.priority > 0 and verdict(row, call, auto=True).auto:
                return row.backend
        raise ValueError(f"no fastkd backend runs {family} on device {device.type!r} for {_describe(dtypes)} inputs")
    if requested in names:
        answer = verdict(next(row for row in usable if row.backend == requested), call, auto=False)
        if answer.serves:
            return requested
        others = sorted({row.backend for row in usable if row.backend != requested and (
            not row.condition or verdict(row, call, auto=False).serves)})
        raise ValueError(f"backend={requested!r} cannot run this {family} call: {answer.reason}. Backends that "
                         f"run it: {others}")
    rows = [row for row in ROWS if row.family == family and row.backend == requested]
    if not rows:
        why = f"backend={requested!r} has no {family} kernels"
    elif not any(row.devices is None or device.type in row.devices for row in rows):
        why = f"backend={requested!r} does not run {family} on {device.type!r} devices"
    elif not _runs(requested, device.type)[0]:
        why = f"backend={requested!r} is not available here: {_runs(requested, device.type)[1]}"
    elif not any(features <= row.features for row in rows):
        why = f"backend={requested!r} does not implement {', '.join(sorted(features))} for {family}"
    else:
        why = f"backend={requested!r} does not take {_describe(dtypes)} inputs for {family}"
    wanted = f" with {', '.join(sorted(features))}" if features else ""
    raise ValueError(f"{why}. Backends that run it{wanted} on {device.type} for {_describe(dtypes)} inputs: {names}")


# The conditions, looked up once at import (their modules are pure PyTorch): Dynamo does not trace
# importlib, and select must stay traceable inside a torch.compile'd function.
_CONDITIONS = {row: getattr(importlib.import_module(row.module), row.condition) for row in ROWS if row.condition}


def implementation(family, backend, device_type):
    """The module holding ``backend``'s launchers of ``family`` for tensors on ``device_type``."""
    for row in ROWS:
        if row.family == family and row.backend == backend and (row.devices is None or device_type in row.devices):
            return importlib.import_module(row.module)
    raise ValueError(f"backend {backend!r} has no {family} kernels for {device_type!r} devices")


def rows(family=None):
    """The registry's rows, of one family or all."""
    return tuple(row for row in ROWS if family is None or row.family == family)


def usable_backends(family, device_type, dtypes=(torch.float32,), features=frozenset(), conditional=None):
    """Names of the backends that run ``family`` (with ``features``) on ``device_type`` here, auto's
    choice first. ``conditional``: None lists every row, False only the rows without a per-call
    condition, True only the conditional ones."""
    return list(dict.fromkeys(row.backend for row in _usable(family, device_type, dtypes, features)
                              if conditional is None or bool(row.condition) == conditional))


def available_backends():
    """{family: {backend: BackendStatus}} for every family and backend, usable or not, with the
    reason per device type and the rows' notes (e.g. a backend that reuses another's code)."""
    report = {}
    for family in FAMILIES:
        report[family] = {}
        for backend in BACKENDS:
            family_rows = [row for row in ROWS if row.family == family and row.backend == backend]
            if not family_rows:
                report[family][backend] = BackendStatus(backend, False, (), f"no {family} kernels")
                continue
            devices, reasons, notes = [], {}, []
            for row in family_rows:
                for device_type in ("*",) if row.devices is None else row.devices:
                    ok, reason = _runs(backend, device_type)
                    if ok:
                        devices.append(device_type)
                    reasons[device_type] = reason
                if row.note and row.note not in notes:
                    notes.append(row.note)
            text = "; ".join(f"{'any device' if d == '*' else d}: {r}" for d, r in reasons.items())
            text += "".join(f" (note: {note})" for note in notes)
            features = tuple(sorted(set.intersection(*(set(row.features) for row in family_rows))))
            report[family][backend] = BackendStatus(backend, bool(devices), tuple(dict.fromkeys(devices)), text,
                                                    features, any(row.condition for row in family_rows))
    return report
