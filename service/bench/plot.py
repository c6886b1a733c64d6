"""The bench's PNG: latency percentiles against throughput, the physical limit marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

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
    ax.set_xlabel("requests/s (2xx)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f"cnnserve bench: {data.get('model', '')} on {data['cores']} core(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
