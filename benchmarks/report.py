"""The final table: every figure for Herald, python-socketio, bare Tornado and the picows
floor, and Herald's ratio to each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.steps import gateway_share

SYSTEMS = ("herald", "sio", "tornado", "picows")
NAMES = {"sio": "socketio", "picows": "picows (floor)"}
SHORT = {"picows": "floor"}


def head(systems: tuple[str, ...] = SYSTEMS) -> tuple[str, ...]:
    """The column titles: each system, then the first one's ratio to each of the others."""
    return ("figure", *(NAMES.get(s, s) for s in systems),
            *(f"{systems[0]}/{SHORT.get(s, s)}" for s in systems[1:]), "target")


HEAD = head()
Row = tuple[str, ...]
Result = dict[str, Any] | None


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


def _system_row(label: str, values: dict[str, float | None], fmt: str, target: str = "",
                cells: dict[str, str] | None = None, systems: tuple[str, ...] = SYSTEMS) -> Row:
    """One figure: each system's value (or a ready-made cell), the first system's ratio
    to each of the others, the target."""
    shown = [cells[s] if cells and s in cells else _num(values.get(s), fmt) for s in systems]
    first = values.get(systems[0])
    return (label, *shown, *(_ratio(first, values.get(s)) for s in systems[1:]), target)


def step_rows(name: str, steps: dict[str, Result], targets: dict[str, str],
              systems: tuple[str, ...] = SYSTEMS) -> list[Row]:
    """A step's figures for each system; durable_bench reuses it with its own systems."""
    rows: list[Row] = []
    for label, fn, fmt, key in (
        ("delivered msgs/s", lambda x: x["delivered_per_s"], ",.0f", "rate"),
        ("delivered per gateway CPU-second", lambda x: x["per_gateway_cpu_s"], ",.0f", "percpu"),
        ("gateway CPU us per delivery", lambda x: x.get("us_per_delivery"), ".1f", "usd"),
        ("gateway CPU us per publication", lambda x: x.get("us_per_publication"), ".1f", "usp"),
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
        values = {s: fn(st) for s, st in steps.items() if st}
        cells = {s: _num(v, fmt) for s, v in values.items()}
        for s, st in steps.items():
            if not st:
                continue
            if key == "rate" and not st["passed"]:  # a step that did not pass is marked
                cells[s] += " (failed)"
            if key == "lost":
                cells[s] += f" ({st['gaps']})"
        rows.append(_system_row(f"{name} {label}", values, fmt, targets.get(key, ""), cells,
                                systems))
    rows.append((f"{name} msgs in from Redis per gateway",
                 *(_ints(steps[s]["messages_in"]) if steps.get(s) else "-" for s in systems),
                 *("" for _ in systems)))
    return rows


def build(results: dict[str, dict[str, Any]], systems: tuple[str, ...] = SYSTEMS) -> list[Row]:
    """The table's rows for the systems that ran (`head(systems)` titles them)."""
    rows: list[Row] = []

    def _pick(results: dict[str, Any], wl: str, fn: Callable[[dict[str, Any]], Result]
              ) -> dict[str, Result]:
        return {s: (fn(results[wl][s]) if results[wl].get(s) else None) for s in systems}

    def _row(label: str, values: dict[str, float | None], fmt: str, target: str = "",
             cells: dict[str, str] | None = None) -> Row:
        return _system_row(label, values, fmt, target, cells, systems)

    for wl, label, target in (("W1", "W1 broadcast", ">= 50,000"),
                              ("W2", "W2 fan-out", ">= 120,000")):
        if wl not in results:
            continue
        rows += step_rows(f"{label} best (p99<250ms)", _pick(results, wl, lambda r: r["best"]),
                           {"rate": target, "p99": "< 250"}, systems)
        fails = _pick(results, wl, lambda r: r["failed_at"])
        rows.append(_row(f"{label} first failing offered rate/s",
                         {s: f["offered_per_s"] if f else None for s, f in fails.items()},
                         ",.0f"))
        if wl == "W1":
            # The light rate: the first counted step (a publication reaches every
            # connection alone), where the cost per delivery is least amortised.
            light = _pick(results, wl, lambda r: r["steps"][0])
            rows += [r for r in step_rows("W1 light (first step)", light, {"usd": "<= 6"},
                                          systems)
                     if "us per" in r[0] or "delivered msgs/s" in r[0]]
        if wl == "W2":
            rows += step_rows("W2 fixed 5,000/s", _pick(results, wl, lambda r: r["fixed"]),
                               {"p99": "< 5"}, systems)
    if "W3" in results:
        w3 = {s: results["W3"].get(s) for s in systems}
        for label, key, fmt, target in (
            ("connections open", "connections", ",d", ""),
            ("authenticated connects/s", "connects_per_s", ",.0f", ">= 1,500"),
            ("connects per gateway CPU-second", "per_gateway_cpu_s", ",.0f", ""),
            ("RSS KiB per connection", "kib_per_conn", ".1f", "<= 11"),
        ):
            rows.append(_row(f"W3 idle {label}", {s: r[key] if r else None
                                                  for s, r in w3.items()}, fmt, target))
        for label, key, suffix in (("gateway CPU % (connecting)", "gateway", ""),
                                   ("gateway waiting for a CPU %", "gateway", ":wait"),
                                   ("generator CPU % (connecting)", "generator", "")):
            def cpu(r: Result, key: str = key, suffix: str = suffix) -> float | None:
                if not r:
                    return None
                return sum(v for k, v in r["cpu"].items()
                           if k.startswith(key) and k.endswith(suffix) and (suffix or ":" not in k))
            rows.append(_row(f"W3 idle {label}", {s: cpu(r) for s, r in w3.items()}, ".0f"))
    if "pair" in results:
        pair = {s: results["pair"].get(s) for s in systems}
        rows.append(_row("2 servers, disjoint jobs: published",
                         {s: r["published"] if r else None for s, r in pair.items()}, ",d"))
        rows.append(("2 servers: msgs in from Redis per server",
                     *(_ints(r["messages_in"]) if r else "-" for r in pair.values()),
                     *("" for _ in systems[1:]), "each: own channels only"))
        rows.append(("2 servers: delivered msgs/s / lost",
                     *(f"{r['delivered_per_s']:,.0f} / {r['lost']}" if r else "-"
                       for r in pair.values()), *("" for _ in systems)))
    return rows


def render(rows: list[Row], head: Row = HEAD) -> str:
    table = [head, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = []
    for n, row in enumerate(table):
        lines.append("  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)
