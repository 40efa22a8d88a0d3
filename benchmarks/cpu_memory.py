"""Peak extra CPU memory of one step, measured in a fresh process.

The high-water mark of resident memory (VmHWM) only ever grows, so each measurement
needs a process of its own: import, warm up on a tiny input (lazy initialisation is not the
op's memory), create the inputs, then run the step once. Extra = high-water mark after the step
minus resident memory before it, outputs and the gradient included.

One process serves both modes of a provider: "fwd" runs first, and "fwd+bwd" repeats the same
forward before its backward, so its peak is at least the forward's: the high-water mark after
it is its own.

Run as ``python -m benchmarks.cpu_memory '<json>'``; ``measure`` does that from the runner.
"""

import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .config import Case
from .harness import make_step
from .providers import by_name, make_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent
_TIMEOUT_S = 600


def run_probe(module, request):
    """Runs ``python -m <module> <request as JSON>`` in a fresh process from the repository root (a
    high-water mark only grows: one process per measurement). Returns (the last line it printed,
    "") or (None, why it gave none)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run([sys.executable, "-m", module, json.dumps(request)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"memory probe timed out after {_TIMEOUT_S} s"
    if done.returncode != 0:
        return None, "memory probe failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1]
    return done.stdout.strip().splitlines()[-1], ""


def peak_mib(module, request):
    """(Peak extra MiB a probe printed in bytes, "") or (None, why)."""
    line, why = run_probe(module, request)
    return (None, why) if line is None else (float(line) / (1 << 20), "")


def measure(case, provider_name, modes):
    """Returns ({mode: extra bytes} or None, a reason when None). ``modes`` in MODES order."""
    line, why = run_probe("benchmarks.cpu_memory", {"case": asdict(case), "provider": provider_name,
                                                    "modes": list(modes)})
    return (None, why) if line is None else (json.loads(line), "")


def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"{field} missing from /proc/self/status")


def _resident_bytes():
    try:
        return _proc_status_bytes("VmRSS")
    except OSError:
        return _high_water_bytes()


def _high_water_bytes():
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so a child forked from the (large)
    # runner process starts with the runner's resident size as its high-water mark.
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:  # no /proc (macOS): ru_maxrss, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(payload):
    request = json.loads(payload)
    case = Case(**request["case"])
    loss_fn = by_name(request["provider"]).make(case)
    cpu = torch.device("cpu")
    for mode in request["modes"]:
        make_step(loss_fn, *make_inputs(replace(case, N=2), cpu), mode)()

    inputs = make_inputs(case, cpu)
    # One baseline for both modes: memory the allocator kept after the first step is still the op's.
    before = _resident_bytes()
    extra = {}
    for mode in request["modes"]:
        result = make_step(loss_fn, *inputs, mode)()
        extra[mode] = max(_high_water_bytes() - before, 0)
        del result
    print(json.dumps(extra))


if __name__ == "__main__":
    _child(sys.argv[1])
