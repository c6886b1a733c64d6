"""The bench report as Markdown tables (what `cnnserve bench` prints)."""

from __future__ import annotations

from typing import Any


def _errors(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(p["errors"].items())) or "0"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _cpu_ms(p: dict[str, Any]) -> str:
    if not p.get("server_cpu_s") or not p["ok"]:
        return "–"
    return f"{p['server_cpu_s'] * 1e3 / p['ok']:.3f}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def sweep_table(data: dict[str, Any]) -> str:
    rows = [
        "| server | conn | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | batch "
        "| CPU cores | CPU ms/req | RSS MB | limit req/s | efficiency | CPU efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        for p in run["points"]:
            rows.append(
                f"| {run['config']} | {p['connections']} | {p['requests_per_s']:.0f} "
                f"| {p['p50_ms']:.1f} | {p['p90_ms']:.1f} | {p['p99_ms']:.1f} "
                f"| {p['p99.9_ms']:.1f} | {_errors(p)} | {p['served_batch']:g} "
                f"| {p.get('server_cores', '–')} | {p.get('cpu_ms_per_request', '–')} "
                f"| {p.get('server_rss_mb', '–')} | {p['limit_rps']:.0f} | {p['efficiency']:.0%} "
                f"| {_pct(p.get('cpu_efficiency'))} |"
            )
    for peer in data.get("peers", []):
        for p in peer["points"]:
            rows.append(
                f"| {peer['key']} ({peer['workers']}w) | {p['connections']} "
                f"| {p['requests_per_s']:.0f} | {p['p50_ms']:.1f} | {p['p90_ms']:.1f} "
                f"| {p['p99_ms']:.1f} | {p['p99.9_ms']:.1f} | {_errors(p)} "
                f"| {p.get('served_batch', 1):g} | {p.get('server_cores', '–')} | {_cpu_ms(p)} "
                f"| {p.get('server_rss_mb', '–')} | – | – | – |"
            )
    return "\n".join(rows)


def limits_table(data: dict[str, Any]) -> str:
    limits = data["limits"]
    rows = [
        "| part, alone | cost per request | alone on all cores |",
        "|---|---|---|",
    ]
    cores = data["cores"]
    for run in data["runs"]:
        http = run["http_alone"]
        p = run["points"][-1]
        rows.append(
            f"| HTTP (GET /healthz, {run['config']}) | {p['http_ms']:.3f} ms CPU "
            f"| {http['requests_per_s']:.0f} req/s measured |"
        )
    decode = limits["decode_ms"]
    rows.append(f"| decode + resize | {decode:.3f} ms CPU | {cores * 1e3 / decode:.0f} img/s |")
    for batch, ms in limits["inference_ms_per_image"].items():
        rows.append(
            f"| inference ({limits['runtime']}), batch {batch} | {ms:.3f} ms CPU/image "
            f"| {cores * 1e3 / ms:.0f} img/s |"
        )
    return "\n".join(rows)


def side_by_side_table(data: dict[str, Any]) -> str:
    """The gateway's req/s over each peer's, per setting and concurrency (same run)."""
    peers = [peer for peer in data.get("peers", []) if peer["points"]]
    if not peers or not data.get("side_by_side"):
        return ""
    head = "".join(f" | {peer['key']} req/s | gateway ÷ {peer['key']}" for peer in peers)
    rows = [
        f"| side by side: gateway | conn | gateway req/s{head} |",
        "|---|---|---" + "|---|---" * len(peers) + "|",
    ]
    for row in data["side_by_side"]:
        cells = "".join(
            f" | {row[peer['key'] + '_rps']:.0f} | {_ratio(row['vs_' + peer['key']])}"
            for peer in peers
        )
        rows.append(f"| {row['config']} | {row['connections']} | {row['gateway_rps']:.0f}{cells} |")
    return "\n".join(rows)


def overload_table(data: dict[str, Any]) -> str:
    """The overload check (:mod:`service.bench.overload`): each level, then each target."""
    unloaded, capacity = data["unloaded"], data["capacity"]
    unit = data.get("level_unit", "connections")
    load = "gRPC load" if data.get("protocol") == "grpc" else "wrk"
    lines = [
        f"unloaded probe: p50 {unloaded['p50_ms']} ms, p99 {unloaded['p99_ms']} ms; capacity "
        f"({capacity['connections']} {unit}): {capacity['requests_per_s']:.0f} req/s",
        "",
        f"| {unit} | goodput | statuses ({load}) | probe p50 / p99 (200s) | 503 p50 polite / "
        "spinning | not ready | RSS first → last |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in data["levels"]:
        wrk, probe, rss = level["wrk"], level["probe_200"], level["rss_mb"]
        memory = "not measured" if rss["first"] is None else f"{rss['first']} → {rss['last']} MiB"
        lines.append(
            f"| {_level(level)} | {wrk['requests_per_s']:.0f} req/s "
            f"({level['goodput_share']:.0%}) | {wrk['statuses']} | {probe['p50_ms']} / "
            f"{probe['p99_ms']} ms | {level['probe_503_p50_ms']} / "
            f"{level['spinner_503_p50_ms']} ms | {level['readiness']['not_ready']} of "
            f"{level['readiness']['polls']} | {memory} |"
        )
    lines += ["", f"| {unit} | target | met | measured |", "|---|---|---|---|"]
    for t in data["targets"]:
        met = {True: "yes", False: "NO", None: "–"}[t["met"]]
        name = t.get("level", t["connections"])
        lines.append(f"| {name} | {t['target']} | {met} | {t['measured']} |")
    return "\n".join(lines)


def _level(level: dict[str, Any]) -> str:
    """A level's name: its connections (calls), or what its open loop sent."""
    return str(level.get("label", level["connections"]))
