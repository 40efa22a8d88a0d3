"""Bar charts of the results: median time per provider per divergence, one panel per mode, the
bandwidth floor drawn across each group. One PNG per (dtype, N, V)."""

from .config import MODES


def _unique(values):
    return list(dict.fromkeys(values))


def plot(results, out_dir):
    """Writes the PNGs into ``out_dir``; returns their paths. Raises ImportError without matplotlib
    (imported here so that the rest of the run needs only torch)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; the benchmark machines have no display
    import matplotlib.pyplot as plt

    measurements = results["measurements"]
    paths = []
    for dtype, N, V in _unique((m["dtype"], m["N"], m["V"]) for m in measurements):
        group = [m for m in measurements if (m["dtype"], m["N"], m["V"]) == (dtype, N, V)]
        divergences = _unique(m["divergence"] for m in group)
        providers = _unique(m["provider"] for m in group)
        fig, axes = plt.subplots(1, len(MODES), figsize=(max(6.0, 1.4 * len(divergences)) * len(MODES), 4.5))
        width = 0.8 / len(providers)
        for ax, mode in zip(axes, MODES):
            cell = {(m["divergence"], m["provider"]): m for m in group if m["mode"] == mode}
            for i, provider in enumerate(providers):
                xs, heights, low, high = [], [], [], []
                for x, divergence in enumerate(divergences):
                    m = cell.get((divergence, provider))
                    if m is None or m["median_ms"] is None:
                        continue
                    xs.append(x - 0.4 + (i + 0.5) * width)
                    heights.append(m["median_ms"])
                    low.append(m["median_ms"] - m["q20_ms"])
                    high.append(m["q80_ms"] - m["median_ms"])
                ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=provider)
            for x, divergence in enumerate(divergences):
                floors = [m["floor_ms"] for (d, _), m in cell.items() if d == divergence]
                if floors:
                    ax.hlines(floors[0], x - 0.45, x + 0.45, colors="black", linestyles="--",
                              label="bandwidth floor" if x == 0 else None)
            ax.set_xticks(range(len(divergences)), divergences, rotation=20)
            ax.set_ylabel("median time (ms)")
            ax.set_title(mode)
            ax.legend(fontsize="small")
        fig.suptitle(f"kd_loss {dtype} N={N} V={V} — {results['environment']['device']}", fontsize="medium")
        fig.tight_layout()
        path = out_dir / f"kd_loss_{dtype}_{N}x{V}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
