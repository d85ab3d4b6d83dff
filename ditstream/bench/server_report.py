"""What ``bench server`` reads off a server (its batch-size histogram, its CPU time) and how it reports:
percentiles, paired ratios of interleaved arms, the tables."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

if TYPE_CHECKING:
    from ditstream.bench.server import BenchSpec


def metric_buckets(text: str, name: str) -> dict[float, float]:
    """The cumulative buckets (le → count) of histogram ``name`` in a Prometheus text page."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def scrape_metrics(http_url: str, headers: dict[str, str] | None) -> dict[str, dict[float, float]]:
    text = httpx.get(http_url + "/metrics", headers=headers, timeout=10).text
    return {"lag": metric_buckets(text, "ditstream_event_loop_lag_seconds"), "batch": metric_buckets(text, "ditstream_batch_size")}


def batch_histogram(before: dict[float, float], after: dict[float, float]) -> dict[str, int]:
    """Per-bucket counts over the run from two cumulative scrapes: {"≤ le": n} for buckets with any."""
    les = sorted(after)
    cum = [after[k] - before.get(k, 0.0) for k in les]
    out, prev = {}, 0.0
    for le, c in zip(les, cum, strict=True):
        if c - prev > 0:
            out["+Inf" if le == float("inf") else f"{le:g}"] = int(c - prev)
        prev = c
    return out


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a local process (all its threads), from /proc; None elsewhere."""
    if pid is None:
        return None
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


def paired_ratio(runs: dict[str, list[dict[str, Any]]], num: str, den: str, key: str) -> float:
    """Median over repeats of ``runs[num][i][key] / runs[den][i][key]``."""
    ratios = [a[key] / b[key] for a, b in zip(runs[num], runs[den], strict=True) if b[key]]
    return round(float(np.median(ratios)), 3) if ratios else float("nan")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's repeats as one row: medians of the numbers, batch-size counts summed, lists of the median run."""
    mid = sorted(runs, key=lambda r: r["fps_total"])[len(runs) // 2]
    out = dict(mid)
    for key, value in mid.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = round(float(np.median([r[key] for r in runs])), 3)
    sizes: dict[str, int] = {}
    for r in runs:
        for k, n in r.get("batch_sizes", {}).items():
            sizes[k] = sizes.get(k, 0) + n
    out["batch_sizes"] = sizes
    return out


def mode_of(spec: BenchSpec, r: dict[str, Any]) -> str:
    n = r.get("streams", spec.streams)
    return f"{n} × {spec.inflight} in flight" if spec.inflight else f"{n} × {spec.fps:g}"


def format_report(spec: BenchSpec, results: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("streams × input fps (or in flight)", lambda r: mode_of(spec, r)),
        ("output fps per stream (mean)", lambda r: f"{r['fps_per_stream_mean']:.1f}"),
        ("output fps per stream (min)", lambda r: f"{min(r['fps_per_stream'], default=0):.1f}"),
        ("output fps, all streams", lambda r: f"{r.get('fps_total', float('nan')):.1f}"),
        ("per-stream fps spread (max−min)/mean", lambda r: f"{r.get('fps_spread_pct', float('nan')):.1f} %"),
        ("batch sizes (size: calls)", lambda r: " ".join(f"{k}:{v}" for k, v in r.get("batch_sizes", {}).items())
         or "-"),
        ("glass-to-glass p50 / p99 ms", lambda r: f"{r['g2g_ms_p50']:.1f} / {r['g2g_ms_p99']:.1f}"),
        ("server overhead p50 / p99 ms", lambda r: f"{r['server_overhead_ms_p50']:.2f} / "
                                                  f"{r['server_overhead_ms_p99']:.2f}"),
        ("  decode / encode p50 ms", lambda r: f"{r['decode_ms_p50']:.2f} / {r['encode_ms_p50']:.2f}"),
        ("server CPU per frame ms (local)", lambda r: f"{r.get('server_cpu_ms_per_frame', float('nan')):.2f}"),
        ("dropped % / skipped %", lambda r: f"{r['dropped_pct']:.1f} / {r['skipped_pct']:.1f}"),
        ("input JPEG bytes per frame", lambda r: f"{r.get('frame_bytes', float('nan')):.0f}"),
        ("server loop stalls > 20 ms", lambda r: f"{r['server_loop_stalls_over_20ms']} of {r['server_loop_ticks']}"),
        ("server loop lag max (≤ bucket)", lambda r: f"{r['server_loop_lag_max_ms_le']} ms"),
        ("bench client loop lag max", lambda r: f"{r['client_loop_lag_ms_max']} ms"),
    ]
    names = list(results)
    width = max(len(r[0]) for r in rows) + 2
    load = f"{spec.inflight} frame(s) in flight (closed loop)" if spec.inflight else f"{spec.fps:g} fps (open loop)"
    col = max([22, *(len(n) + 2 for n in names)])
    lines = [f"ditstream bench server: {spec.streams} streams, {spec.width}x{spec.height} JPEG q{spec.quality} "
             f"{spec.subsampling[0]}:{spec.subsampling[1]}:{spec.subsampling[2]} at "
             f"{load} for {spec.seconds:g} s", "",
             "".ljust(width) + "".join(n.rjust(col) for n in names)]
    for label, fn in rows:
        lines.append(label.ljust(width) + "".join(fn(results[n]).rjust(col) for n in names))
    if "server" in results and "null engine" in results:
        s, n = results["server"], results["null engine"]
        if s["g2g_ms_p50"] and s["g2g_ms_p50"] == s["g2g_ms_p50"]:
            lines += ["", f"server share of glass-to-glass p50: {100 * n['g2g_ms_p50'] / s['g2g_ms_p50']:.1f} %"]
    for name, r in results.items():
        if r["errors"]:
            lines.append(f"{name}: errors: {r['errors']}")
    return "\n".join(lines)


def format_arms(spec: BenchSpec, arms: dict[str, BenchSpec], runs: dict[str, list[dict[str, Any]]]) -> str:
    """The arms' median runs side by side, then each pair's ratios (medians of per-repeat ratios)."""
    merged = {name: median_run(r) for name, r in runs.items()}
    repeats = len(next(iter(runs.values()), []))
    lines = [format_report(spec, merged), "",
             f"medians of {repeats} interleaved repeat(s); null engine {spec.null_delay_ms:g} ms per call; ratios "
             "are medians of per-repeat ratios:"]
    names = list(arms)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = arms[a], arms[b]
            if sa.batch_wait == sb.batch_wait and sa.streams != sb.streams:
                big, small = (a, b) if sa.streams > sb.streams else (b, a)
                lines.append(f"  {big} / {small}: total fps ×{paired_ratio(runs, big, small, 'fps_total'):.2f}, "
                             f"g2g p50 ×{paired_ratio(runs, big, small, 'g2g_ms_p50'):.2f}")
            elif sa.streams == sb.streams and sa.batch_wait != sb.batch_wait:
                lines.append(f"  {a} / {b}: total fps ×{paired_ratio(runs, a, b, 'fps_total'):.2f}, "
                             f"g2g p50 ×{paired_ratio(runs, a, b, 'g2g_ms_p50'):.2f}, "
                             f"dropped {merged[a]['dropped_pct']:.1f} % vs {merged[b]['dropped_pct']:.1f} %")
    return "\n".join(lines)
