"""The final table: every figure for Herald, for python-socketio, and their ratio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.steps import gateway_share

Row = tuple[str, str, str, str, str]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(h: float | None, s: float | None) -> str:
    if h is None or s is None or not s:
        return "-"
    return f"{h / s:.2f}x"


def _ints(values: list[int] | None) -> str:
    return "-" if values is None else "/".join(f"{v:,}" for v in values)


def _gw_cpu(step: dict[str, Any]) -> float:
    return gateway_share(step["cpu"])


def _gw_wait(step: dict[str, Any]) -> float:
    return gateway_share(step["cpu"], ":wait")


def step_rows(name: str, h: dict[str, Any] | None, s: dict[str, Any] | None,
               targets: dict[str, str]) -> list[Row]:
    def pick(fn: Callable[[dict[str, Any]], float]) -> tuple[float | None, float | None]:
        return (fn(h) if h else None, fn(s) if s else None)

    rows: list[Row] = []
    for label, fn, fmt, key in (
        ("delivered msgs/s", lambda x: x["delivered_per_s"], ",.0f", "rate"),
        ("delivered per gateway CPU-second", lambda x: x["per_gateway_cpu_s"], ",.0f", "percpu"),
        ("latency p50 ms", lambda x: x["p50_ms"], ".1f", "p50"),
        ("latency p99 ms", lambda x: x["p99_ms"], ".1f", "p99"),
        ("latency max ms", lambda x: x["max_ms"], ".1f", "max"),
        ("lost (of which offset gaps)", lambda x: x["lost"], "d", "lost"),
        ("gateway CPU %", _gw_cpu, ".0f", "cpu"),
        ("gateway waiting for a CPU %", _gw_wait, ".0f", "wait"),
        ("generator CPU %", lambda x: x["cpu"]["generator"], ".0f", "gen"),
        ("generator waiting for a CPU %", lambda x: x["cpu"]["generator:wait"], ".0f", "gwait"),
        ("publisher CPU %", lambda x: x["cpu"]["publisher"], ".0f", "pub"),
        ("redis-server CPU %", lambda x: x["cpu"]["redis"], ".0f", "redis"),
    ):
        hv, sv = pick(fn)
        hs, ss = _num(hv, fmt), _num(sv, fmt)
        if key == "rate":  # a step that did not pass is marked
            hs += "" if not h or h["passed"] else " (failed)"
            ss += "" if not s or s["passed"] else " (failed)"
        if key == "lost":
            hs += f" ({h['gaps']})" if h else ""
            ss += f" ({s['gaps']})" if s else ""
        rows.append((f"{name} {label}", hs, ss, _ratio(hv, sv), targets.get(key, "")))
    rows.append((f"{name} msgs in from Redis per gateway",
                 _ints(h["messages_in"] if h else None), _ints(s["messages_in"] if s else None),
                 "", ""))
    return rows


def build(results: dict[str, dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for wl, label, target in (("W1", "W1 broadcast", ">= 50,000"),
                              ("W2", "W2 fan-out", ">= 45,000")):
        if wl not in results:
            continue
        h, s = results[wl].get("herald"), results[wl].get("sio")
        rows += step_rows(f"{label} best (p99<250ms)", h and h["best"], s and s["best"],
                           {"rate": target, "p99": "< 250"})
        fail_h = h and h["failed_at"] and h["failed_at"]["offered_per_s"]
        fail_s = s and s["failed_at"] and s["failed_at"]["offered_per_s"]
        rows.append((f"{label} first failing offered rate/s", _num(fail_h, ",.0f"),
                     _num(fail_s, ",.0f"), "", ""))
        if wl == "W2":
            rows += step_rows("W2 fixed 5,000/s", h and h["fixed"], s and s["fixed"],
                               {"p99": "< 5"})
    if "W3" in results:
        h, s = results["W3"].get("herald"), results["W3"].get("sio")
        for label, key, fmt, target in (
            ("connections open", "connections", ",d", ""),
            ("authenticated connects/s", "connects_per_s", ",.0f", ">= 1,200"),
            ("connects per gateway CPU-second", "per_gateway_cpu_s", ",.0f", ""),
            ("RSS KiB per connection", "kib_per_conn", ".1f", "<= 12"),
        ):
            hv, sv = (h[key] if h else None), (s[key] if s else None)
            rows.append((f"W3 idle {label}", _num(hv, fmt), _num(sv, fmt), _ratio(hv, sv),
                         target))
        for label, key, suffix in (("gateway CPU % (connecting)", "gateway", ""),
                                   ("gateway waiting for a CPU %", "gateway", ":wait"),
                                   ("generator CPU % (connecting)", "generator", "")):
            def cpu(r: dict[str, Any] | None, key: str = key, suffix: str = suffix
                    ) -> float | None:
                if not r:
                    return None
                return sum(v for k, v in r["cpu"].items()
                           if k.startswith(key) and k.endswith(suffix) and (suffix or ":" not in k))
            hv, sv = cpu(h), cpu(s)
            rows.append((f"W3 idle {label}", _num(hv, ".0f"), _num(sv, ".0f"),
                         _ratio(hv, sv), ""))
    if "pair" in results:
        h, s = results["pair"].get("herald"), results["pair"].get("sio")
        rows.append(("2 servers, disjoint jobs: published", _num(h and h["published"], ",d"),
                     _num(s and s["published"], ",d"), "", ""))
        rows.append(("2 servers: msgs in from Redis per server",
                     _ints(h["messages_in"] if h else None),
                     _ints(s["messages_in"] if s else None), "", "each: own channels only"))
        rows.append(("2 servers: delivered msgs/s / lost",
                     f"{h['delivered_per_s']:,.0f} / {h['lost']}" if h else "-",
                     f"{s['delivered_per_s']:,.0f} / {s['lost']}" if s else "-", "", ""))
    return rows


HEAD: Row = ("figure", "herald", "socketio", "herald/sio", "target")


def render(rows: list[Row], head: Row = HEAD) -> str:
    table = [head, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = []
    for n, row in enumerate(table):
        lines.append("  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
