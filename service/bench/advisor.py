"""Batching advisor: from a sweep, the setting that serves most within a p99 SLO."""

from __future__ import annotations

from typing import Any

KNOBS = ("max_batch_size", "batch_timeout_micros", "num_batch_threads")


def recommend(runs: list[dict[str, Any]], slo_p99_ms: float) -> dict[str, Any]:
    """The error-free point with the most req/s whose p99 meets the SLO; when none does,
    the point with the lowest p99 (and ``meets_slo`` false)."""
    points = [p for run in runs for p in run["points"] if not p["errors"] and p["ok"]]
    if not points:
        return {"slo_p99_ms": slo_p99_ms, "meets_slo": False, "reason": "no error-free point"}
    within = [p for p in points if p["p99_ms"] <= slo_p99_ms]
    best = (
        max(within, key=lambda p: p["requests_per_s"])
        if within
        else min(points, key=lambda p: p["p99_ms"])
    )
    return {
        "slo_p99_ms": slo_p99_ms,
        "meets_slo": bool(within),
        "workers": best["workers"],
        **{k: best[k] for k in KNOBS},
        "at": {k: best[k] for k in ("connections", "requests_per_s", "p99_ms", "served_batch")},
        "batching_config": batching_config(best),
    }


def batching_config(point: dict[str, Any]) -> str:
    """The lines to paste into model_repository/batching.config (TF Serving's text
    protobuf; the gateway reads the same knobs from CNNSERVE_* variables)."""
    return "".join(f"{k} {{ value: {point[k]} }}\n" for k in KNOBS)


def describe(advice: dict[str, Any]) -> str:
    if "workers" not in advice:
        return f"batching advisor: {advice['reason']}"
    at = advice["at"]
    head = (
        f"batching advisor (p99 ≤ {advice['slo_p99_ms']:g} ms): "
        if advice["meets_slo"]
        else f"batching advisor: no point met p99 ≤ {advice['slo_p99_ms']:g} ms; lowest p99: "
    )
    return (
        f"{head}{advice['workers']} worker(s), {at['requests_per_s']:.0f} req/s at "
        f"{at['connections']} connections, p99 {at['p99_ms']:.1f} ms, mean batch "
        f"{at['served_batch']:g}\n"
        f"CNNSERVE_WORKERS={advice['workers']}; batching.config:\n{advice['batching_config']}"
    )
