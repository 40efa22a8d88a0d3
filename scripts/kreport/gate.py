"""What fails the report: a kernel that does not compile, a spill (any: there is no allow-list), a
kernel no case covers, a launcher that cannot be called."""

from .render import demangle


def _spills(result):
    return result["spill_stores"] or result["spill_loads"]


def failures(collected):
    """Human-readable reasons the report fails; empty when it passes."""
    reasons = [f"launcher call failed: {label}: {error}" for label, error in collected.case_errors]
    reasons += [f"no case covers {name}" for name in collected.uncovered]
    seen = set()
    for arch, case, kernel, description, key, result in collected.triton_rows:
        if (key, arch) in seen:
            continue
        seen.add((key, arch))
        if not result["ok"]:
            reasons.append(f"{kernel} [{description}] sm_{arch} does not compile: {result['error']}")
        elif _spills(result):
            reasons.append(f"{kernel} [{description}] sm_{arch} spills {result['spill_stores']} bytes "
                           f"(stores) / {result['spill_loads']} (loads)")
    reasons += [f"{source} sm_{arch} does not compile: {error}" for arch, source, error in collected.cuda_errors]
    spilling = [row for row in collected.cuda_rows if _spills(row[3])]
    for (arch, source, _, result), name in zip(spilling, demangle([row[2] for row in spilling])):
        reasons.append(f"{source}: {name} sm_{arch} spills {result['spill_stores']} bytes")
    return reasons
