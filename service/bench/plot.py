"""The bench's PNG: latency percentiles against throughput, the physical limit marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    series = [(run["config"], run["points"]) for run in data["runs"]]
    series += [(peer["label"], peer["points"]) for peer in data.get("peers", []) if peer["points"]]
    for i, (label, points) in enumerate(series):
        color = f"C{i}"
        rps = [p["requests_per_s"] for p in points]
        ax.plot(rps, [p["p50_ms"] for p in points], "o--", color=color, label=f"{label} p50")
        ax.plot(rps, [p["p99_ms"] for p in points], "s-", color=color, label=f"{label} p99")
    limits = [p["limit_rps"] for run in data["runs"] for p in run["points"]]
    if limits:
        best = max(limits)
        ax.axvline(best, color="k", linestyle=":", label=f"physical limit ≈ {best:.0f} req/s")
    title = f"cnnserve bench: {data.get('model', '')} on {data['cores']} core(s)"
    _save(fig, ax, path, xlabel="requests/s (2xx)", title=title, legend="best")


def _save(fig: Any, ax: Any, path: Path, *, xlabel: str, title: str, legend: str) -> None:
    """Latency on a log scale (plain numbers), labels, grid and legend; then the PNG."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc=legend)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_overload(data: dict[str, Any], path: Path) -> None:
    """Every probe and spinner answer over time (log latency; 200s and 503s apart), the
    overload levels shaded, failed readiness polls marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    styles = {
        ("probe", 200): ("C0", "probe (polite): 200"),
        ("probe", 503): ("C1", "probe (polite): 503"),
        ("spinner", 503): ("C3", "spinner (retries at once): 503"),
        ("spinner", 200): ("C2", "spinner: 200"),
    }
    labelled: set[str] = set()
    unit = data.get("level_unit", "connections")
    for level in data["levels"]:
        ax.axvspan(level["began_s"], level["ended_s"], color="0.9")
        name = level.get("label", f"{level['connections']} {unit}")
        ax.text(level["began_s"] + 0.1, 0.97, name,
                fontsize=8, va="top", transform=ax.get_xaxis_transform())  # fmt: skip
        for who in ("probe", "spinner"):
            for status in (200, 503):
                points = [(t, ms) for t, s, ms in level["timeline"][who] if s == status]
                if not points:
                    continue
                color, label = styles[(who, status)]
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, ".", ms=2, color=color,
                        label=None if label in labelled else label)  # fmt: skip
                labelled.add(label)
        failed = [t for t, s, _ in level["timeline"]["readiness"] if s != 200]
        if failed:
            label = "readiness poll not 200"
            ax.plot(failed, [1.0] * len(failed), "x", color="k",
                    label=None if label in labelled else label)  # fmt: skip
            labelled.add(label)
    ax.axhline(data["budget_ms"], color="k", linestyle=":", label="queue-wait budget")
    title = (
        f"cnnserve bench --overload ({data.get('protocol', 'rest')}): {data.get('model', '')}, "
        f"{data['workers']} worker(s)"
    )
    _save(fig, ax, path, xlabel="seconds", title=title, legend="lower right")
