"""PNG plots of benchmark records: speed against sequence length (log axes) and the memory wall."""
from collections import defaultdict


def _panels(records):
    groups = defaultdict(list)
    for r in records:
        if r["L"] > 1:
            groups[(r["D"], r["dtype"])].append(r)
    return groups


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axes(ax, ylabel, title):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path


def plot_speed(records, path, title):
    """One figure per run: a row per (D, dtype), columns (causal, pass); GFLOP/s against L, a line per impl."""
    plt = _pyplot()
    groups = _panels(records)
    cols = sorted({(r["causal"], r["pass"]) for r in records if r["L"] > 1})
    if not groups or not cols:
        return None
    fig, axes = plt.subplots(len(groups), len(cols), figsize=(4.2 * len(cols), 3.4 * len(groups)), squeeze=False)
    for row, ((D, dtype), recs) in enumerate(sorted(groups.items())):
        for col, (causal, pass_) in enumerate(cols):
            ax = axes[row][col]
            for impl in sorted({r["impl"] for r in recs}):
                pts = sorted((r["L"], r["tflops"] * 1e3) for r in recs if r["impl"] == impl and r["causal"] == causal
                             and r["pass"] == pass_ and r["status"] == "ok")
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, label=impl)
            _log_axes(ax, "GFLOP/s", f"D={D} {dtype} {'causal' if causal else 'full'} {pass_}")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_memory(records, path, title):
    """Peak (or, for skipped points, predicted) memory against L; skipped naive points mark the wall."""
    plt = _pyplot()
    recs = [r for r in records if r["L"] > 1 and r["peak_mem_bytes"] and r["pass"] == "fwd"]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in sorted({r["impl"] for r in recs}):
        ok = sorted({r["L"]: r["peak_mem_bytes"] / 2**20 for r in recs if r["impl"] == impl
                     and r["status"] == "ok"}.items())
        wall = sorted({r["L"]: r["peak_mem_bytes"] / 2**20 for r in recs if r["impl"] == impl
                       and r["status"] in ("skipped", "oom")}.items())
        line = ax.plot(*zip(*ok), marker="o", ms=3, label=impl)[0] if ok else None
        if wall:
            ax.plot(*zip(*wall), "x--", color=line.get_color() if line else None,
                    label=f"{impl}: predicted, does not fit")
    _log_axes(ax, "peak memory (MiB)", title)
    return _save(fig, path)
