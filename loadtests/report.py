"""The load test's results: OUT/summary.json, CSV files and OUT/report.html.

Merges what each Locust process wrote (OUT/parts/PID.json): messages sent and
received (by id, so losses and duplicates are exact over processes), message
round trips, and one downtime per user per switch. Switches that began before
the fallback was asked for are the failover's, the others the fallback's. The
charts are SVG, drawn here (no plotting library): a downtime histogram per
switch, and successful round trips per second over the run and around the
failure.
"""

from __future__ import annotations

import csv
import html
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client_sim.bench import stats


def merge(parts_dir: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {"sent": set(), "received": set(), "round_trips": [],
                              "downtimes": [], "logins": 0, "login_failures": 0,
                              "duplicated": 0, "round_trips_open": 0, "processes": 0}  # fmt: skip
    for path in sorted(parts_dir.glob("*.json")):
        if path.name.endswith(".progress.json"):
            continue
        part = json.loads(path.read_text())
        merged["processes"] += 1
        merged["sent"].update(part["sent"])
        merged["received"].update(part["received"])
        merged["round_trips"].extend(part["round_trips"])
        merged["downtimes"].extend(part["downtimes"])
        for key in ("logins", "login_failures", "duplicated", "round_trips_open"):
            merged[key] += part[key]
    return merged


def write(out: Path, *, marks: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    merged = merge(out / "parts")
    fallback_at = next((m["time"] for m in marks if "fallback" in m["what"]), float("inf"))
    failed_at = next((m["time"] for m in marks if m["what"].startswith("n1:")), None)
    if failed_at is None:  # an interactive run: time from the first switch, or the start
        starts = [d["started"] for d in merged["downtimes"]] or [
            t for t, _ in merged["round_trips"]
        ]
        failed_at = min(starts, default=0.0)
    failover = [d for d in merged["downtimes"] if d["started"] < fallback_at]
    fallback = [d for d in merged["downtimes"] if d["started"] >= fallback_at]
    sent, received = merged["sent"], merged["received"]
    messages = {"sent": len(sent), "received": len(received & sent),
                "lost": len(sent - received), "duplicated": merged["duplicated"]}  # fmt: skip
    round_trips = sorted(merged["round_trips"])
    summary = {
        "benchmark": "loadtest_failover_with_dual_connections",
        **meta,
        "downtime_s": stats([d["ms"] / 1000 for d in failover]),
        "fallback_downtime_s": stats([d["ms"] / 1000 for d in fallback]),
        "pushed": {"failover": sum(1 for d in failover if d["pushed"]),
                   "fallback": sum(1 for d in fallback if d["pushed"])},  # fmt: skip
        "messages": messages,
        "round_trip_s": stats([ms / 1000 for _, ms in round_trips]),
        "round_trips_unanswered": merged["round_trips_open"],
        "logins": merged["logins"], "login_failures_retried": merged["login_failures"],
        "locust_processes": merged["processes"],
        "marks": [{"what": m["what"], "at_s": round(m["time"] - failed_at, 3)} for m in marks],
    }  # fmt: skip
    summary["headline"] = {k: summary[k] for k in ("scenario", "users", "users_of_n1",
                           "downtime_s", "fallback_downtime_s", "messages")}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "downtimes.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "home", "switch", "kind", "started_s", "downtime_ms", "pushed"])
        for d in sorted(merged["downtimes"], key=lambda d: d["started"]):
            kind = "fallback" if d["started"] >= fallback_at else "failover"
            writer.writerow([d["user"], d["home"], d["switch"], kind,
                             f"{d['started'] - failed_at:.3f}", f"{d['ms']:.1f}", d["pushed"]])  # fmt: skip
    start = round_trips[0][0] if round_trips else failed_at
    per_second = rate(round_trips, start, 1.0)
    with (out / "round_trips_per_second.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["second_since_failure", "round_trips"])
        for i, count in enumerate(per_second):
            writer.writerow([f"{start - failed_at + i:.0f}", f"{count:.0f}"])
    charts = {
        "downtime.svg": histogram([d["ms"] for d in failover], "failover downtime, ms"),
        "fallback-downtime.svg": histogram([d["ms"] for d in fallback], "fallback downtime, ms"),
        "timeline.svg": timeline(
            per_second,
            1.0,
            start - failed_at,
            marks,
            failed_at,
            "successful round trips per second, whole run",
        ),  # fmt: skip
        "timeline-failure.svg": timeline(
            rate(round_trips, failed_at - 5, 0.1, until=failed_at + 10),
            0.1,
            -5.0,
            marks,
            failed_at,
            "round trips per second around the failure (0.1 s bins)",
        ),  # fmt: skip
    }
    for name, svg in charts.items():
        (out / name).write_text(svg)
    (out / "report.html").write_text(page(summary, charts))
    return summary


def rate(events: Sequence[tuple[float, float]], start: float, width: float,
         until: float | None = None) -> list[float]:  # fmt: skip
    """Events per second in bins of `width` seconds from `start` (to the last, or `until`)."""
    end = until if until is not None else (events[-1][0] if events else start)
    bins = [0.0] * max(1, int((end - start) / width) + 1)
    for when, _ in events:
        index = int((when - start) / width)
        if 0 <= index < len(bins):
            bins[index] += 1 / width
    return bins


WIDTH, HEIGHT, PAD, RIGHT = 760, 280, 50, 30  # px; PAD: left, top, bottom margins


def _frame(title: str, y_max: float, x_labels: list[tuple[float, str]]) -> list[str]:
    inner_h = HEIGHT - 2 * PAD
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13">'
             f"{html.escape(title)}</text>",
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - PAD}" stroke="black"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="black"/>']  # fmt: skip
    for fraction in (0, 0.5, 1):
        y = HEIGHT - PAD - fraction * inner_h
        parts.append(
            f'<text x="{PAD - 4}" y="{y + 4:.1f}" text-anchor="end">{y_max * fraction:.0f}</text>'
        )
    for x, label in x_labels:
        parts.append(
            f'<text x="{x:.1f}" y="{HEIGHT - PAD + 14}" text-anchor="middle">{html.escape(label)}</text>'
        )
    return parts


def _bars(values: Sequence[float], y_max: float, color: str) -> list[str]:
    inner_w, inner_h = WIDTH - PAD - RIGHT, HEIGHT - 2 * PAD
    step = inner_w / max(1, len(values))
    return [f'<rect x="{PAD + i * step:.2f}" y="{HEIGHT - PAD - v / y_max * inner_h:.2f}" '
            f'width="{max(step - 0.5, 0.5):.2f}" height="{v / y_max * inner_h:.2f}" fill="{color}"/>'
            for i, v in enumerate(values) if v > 0]  # fmt: skip


def histogram(ms: Sequence[float], title: str, bins: int = 40) -> str:
    if not ms:
        return "".join(_frame(f"{title}: none", 1, [])) + "</svg>"
    top = max(ms) * 1.0001 or 1.0
    counts = [0.0] * bins
    for value in ms:
        counts[min(bins - 1, int(value / top * bins))] += 1
    y_max = max(counts)
    inner_w = WIDTH - PAD - RIGHT
    labels = [(PAD + inner_w * f, f"{top * f:.0f}") for f in (0, 0.25, 0.5, 0.75, 1)]
    parts = _frame(f"{title} ({len(ms)} switches; users per bin)", y_max, labels)
    return "".join(parts + _bars(counts, y_max, "#3a6ea5")) + "</svg>"


def timeline(values: Sequence[float], width: float, first_s: float, marks: list[dict[str, Any]],
             zero: float, title: str) -> str:  # fmt: skip
    """Bars of `width` s from `first_s` (seconds since `zero`), with the run's marks."""
    y_max = max(values, default=1) or 1
    inner_w = WIDTH - PAD - RIGHT
    span = len(values) * width
    labels = [(PAD + inner_w * f, f"{first_s + span * f:.1f} s") for f in (0, 0.25, 0.5, 0.75, 1)]
    parts = _frame(title, y_max, labels) + _bars(values, y_max, "#4c9a2a")
    legend: list[str] = []
    for mark in marks:
        offset = mark["time"] - zero - first_s
        if 0 <= offset <= span:
            x = PAD + offset / span * inner_w
            legend.append(f"{len(legend) + 1}: {mark['what']}")
            parts.append(f'<line x1="{x:.1f}" y1="{PAD}" x2="{x:.1f}" y2="{HEIGHT - PAD}" '
                         f'stroke="#c0392b" stroke-dasharray="4 3"/>'
                         f'<text x="{x + 2:.1f}" y="{PAD - 4}" fill="#c0392b">{len(legend)}</text>')  # fmt: skip
    lines = [" · ".join(legend[i : i + 3]) for i in range(0, len(legend), 3)]
    for row, line in enumerate(lines[:2]):  # the marks, numbered as on the chart
        y = HEIGHT - PAD + 28 + 12 * row
        parts.append(f'<text x="{PAD}" y="{y}" fill="#c0392b">{html.escape(line)}</text>')
    return "".join(parts) + "</svg>"


def page(summary: dict[str, Any], charts: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td><code>{html.escape(json.dumps(v))}</code></td></tr>"
                   for k, v in summary.items() if k != "headline")  # fmt: skip
    images = "".join(f"<figure>{svg}</figure>" for svg in charts.values())
    users = f"{summary['users']} users" if summary.get("users") else "users of the run"
    title = f"xmpp-ha load test: {summary['scenario']}, {users}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{text-align:left;padding:2px 8px;"
        "vertical-align:top}figure{margin:1em 0}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{images}<h2>Summary</h2><table>{rows}</table>"
        "<p>Locust's own report: <a href='locust.html'>locust.html</a>; "
        "CSV: downtimes.csv, round_trips_per_second.csv, locust_stats.csv.</p></body></html>"
    )


def main(argv: list[str]) -> int:
    """`python -m loadtests.report OUT`: the report of an interactive run (the Locust
    processes wrote OUT/parts when the test stopped)."""
    if len(argv) != 1:
        print("usage: python -m loadtests.report OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not any((out / "parts").glob("[0-9]*[0-9].json")):
        print(f"{out}/parts holds no measurements (stop the test first)", file=sys.stderr)
        return 1
    meta = {"scenario": "interactive", "users": None, "users_of_n1": None}
    summary = write(out, marks=[], meta=meta)
    print(json.dumps(summary["headline"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
