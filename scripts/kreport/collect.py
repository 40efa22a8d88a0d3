"""Everything the report shows, gathered: the recorded launches of every case, their compile jobs
for every target (each distinct specialisation compiled once, cached across runs), the CUDA units,
and which kernels no case reaches."""

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from . import cache, cuda_build, cuda_sources, gpus, triton_build, triton_cases, triton_launches


@dataclass
class Collected:
    triton_rows: list = field(default_factory=list)  # (arch, case, kernel, description, key, result)
    cuda_rows: list = field(default_factory=list)  # (arch, source, mangled name, result or None)
    cuda_errors: list = field(default_factory=list)  # (arch, source, error)
    case_errors: list = field(default_factory=list)  # (case label, error)
    uncovered: list = field(default_factory=list)  # kernels no case compiles
    keys: list = field(default_factory=list)  # every result's key: the inputs of the report
    compiled: int = 0  # results not found in the cache
    toolchain: str = ""


def _cuda_key(source, arch, nvcc_version, code_version):
    files = [source] + cuda_sources.headers()
    return cache.digest(cuda_sources.relative(source), arch, nvcc_version, code_version,
                        *((cuda_sources.relative(path), path.read_bytes()) for path in files))


def _record(cases, kernels):
    """[(case, [Launch])] and [(case label, error)]: each case's launcher call, on meta tensors."""
    recorded, errors = [], []
    with triton_launches.recording(kernels) as launches:
        for case in cases:
            before = len(launches)
            try:
                case.call()
            except Exception as exc:  # a launcher that cannot even be called is a failure of the report
                errors.append((case.label, f"{type(exc).__name__}: {exc}"))
                continue
            recorded.append((case, launches[before:]))
    return recorded, errors


def _compile_cuda(task):
    source, arch = task
    return cuda_build.compile_unit(source, arch)


def _run(tasks, results, store, workers):
    """Runs the missing tasks ({key: (function, argument)}) in worker processes, longest first."""
    if not tasks:
        return
    started = time.time()
    context = multiprocessing.get_context("fork")  # workers inherit the imported kernels
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(function, argument): key for key, (function, argument) in tasks.items()}
        for done, future in enumerate(futures, 1):
            key = futures[future]
            results[key] = future.result()
            store.put(key, results[key])
            if done % 20 == 0 or done == len(futures):
                print(f"kernel report: compiled {done}/{len(futures)} in {time.time() - started:.0f} s",
                      file=sys.stderr, flush=True)


def collect(cache_dir=None, workers=2, select=None, archs=gpus.ARCHS, with_cuda=True, plan_only=False):
    """Collected results. ``select``: a predicate on cases (for quick partial runs, not for CI).
    ``plan_only``: record and specialise, compile nothing: ``keys`` and ``uncovered`` only (what
    --check compares with the committed report's digest)."""
    code_version = cache.compile_code_version()
    store = cache.ResultCache(cache_dir)
    out = Collected()
    kernels = triton_launches.discover()
    cases = [case for case in triton_cases.all_cases() if select is None or select(case)]
    recorded, out.case_errors = _record(cases, kernels)
    launched = {launch.kernel for _, launches in recorded for launch in launches}
    if select is None:
        out.uncovered += [name for name in kernels if name not in launched]

    tasks, results, planned = {}, {}, []
    for arch in archs:
        for case, launches in recorded:
            for launch in launches:
                job = triton_build.specialise(kernels[launch.kernel], launch, arch, code_version)
                planned.append((arch, case, launch.kernel.split(":")[1], triton_build.describe(job), job.key))
                if job.key not in results and job.key not in tasks:
                    cached = store.get(job.key)
                    if cached is None:
                        tasks[job.key] = (triton_build.compile_job, job)
                    else:
                        results[job.key] = cached

    nvcc_version = cuda_build.nvcc_version() if with_cuda else None
    units = []
    if with_cuda:
        for source in cuda_sources.sources():
            for arch in archs:
                key = _cuda_key(source, arch, nvcc_version, code_version)
                units.append((arch, source, key))
                cached = store.get(key)
                if cached is None:
                    tasks[key] = (_compile_cuda, (source, arch))
                else:
                    results[key] = cached
    # CUDA units are the longest tasks: first in the queue (dicts keep insertion order).
    ordered = {key: task for key, task in tasks.items() if task[0] is _compile_cuda}
    ordered.update((key, task) for key, task in tasks.items() if task[0] is not _compile_cuda)
    out.keys = sorted({row[4] for row in planned} | {key for _, _, key in units})
    out.toolchain = _toolchain(archs, nvcc_version)
    if plan_only:
        return out
    out.compiled = len(ordered)
    _run(ordered, results, store, workers)

    out.triton_rows = [(arch, case, kernel, description, key, results[key])
                       for arch, case, kernel, description, key in planned]
    for arch, source, key in units:
        unit = results[key]
        relative = cuda_sources.relative(source)
        if not unit["ok"]:
            out.cuda_errors.append((arch, relative, unit["error"]))
        for name, result in sorted(unit["functions"].items()):
            out.cuda_rows.append((arch, relative, name, result))
        if unit["ok"] and select is None:
            defined = cuda_sources.global_functions(source)
            compiled = " ".join(unit["functions"])
            out.uncovered += [f"{relative}:{name} (sm_{arch})" for name in defined if name not in compiled]
    return out


def _toolchain(archs, nvcc_version):
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = ", ".join(f"sm_{arch}: {get_ptxas(arch).version.strip()}" for arch in archs)
    return f"Triton {triton.__version__} (ptxas {ptxas}), {nvcc_version or 'no nvcc'}"
