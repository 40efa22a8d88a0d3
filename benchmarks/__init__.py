"""Benchmarks for fastkd: every provider timed on the same inputs, as a fraction of the
memory-bandwidth floor, with peak memory.

    python -m benchmarks            default sizes for this machine's device
    python -m benchmarks --smoke    tiny sizes, every divergence, a quick end-to-end check
    pytest benchmarks/ --benchmark-only

Layout: ``config`` (sizes and suites), ``providers`` (one setup per op: fastkd backends, eager
PyTorch, torch.compile), ``checks`` (same loss as fastkd before anything is timed), ``harness``
(timing and GPU memory), ``cpu_memory`` (peak RSS in a subprocess), ``floors`` (bytes model and
measured copy bandwidth), ``runner`` (the run), ``report`` and ``plot`` (results/ files).
"""
