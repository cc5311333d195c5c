"""The results table (stdout and results.md) and results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.cases import COMPARISON, Attempt, CaseResult, Metric, Row

_HEADER = ("case", "sender", "files/s", "MB/s", "peak RSS MiB", "ratio", "goal", "met?")


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _cells(result: CaseResult, row: Row, reference: bool) -> tuple[str, ...]:
    name = result.case.name
    if not row.ok:
        error = row.error or "no attempt"
        return (name, row.sender.label, "FAILED", "FAILED", "-", "-", "", error)
    files = row.value(Metric.FILES_PER_S)
    rate = _num(files, 0 if files is not None and files >= 100 else 1)
    mbs = row.value(Metric.MB_PER_S)
    rss = row.peak_rss_mib
    if reference:
        return (name, row.sender.label, rate, _num(mbs, 1), _num(rss), "1.00 (ref)", "", "")
    ratio = result.ratio(row)
    met = result.met(row)
    if row.sender.kind in COMPARISON:
        verdict = "(comparison)"
    else:
        verdict = "n/a (storescu failed)" if met is None else ("yes" if met else "NO")
    return (
        name,
        row.sender.label,
        rate,
        _num(mbs, 1),
        _num(rss),
        _num(ratio, 2),
        result.case.goal.text(),
        verdict,
    )


def rows(results: list[CaseResult]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for result in results:
        out.append(_cells(result, result.reference, True))
        out.extend(_cells(result, row, False) for row in result.contenders)
    return out


def table(results: list[CaseResult]) -> str:
    """A Markdown table (readable as plain text too)."""
    body = rows(results)
    widths = [max(len(r[i]) for r in [_HEADER, *body]) for i in range(len(_HEADER))]
    right = {2, 3, 4, 5}

    def line(cells: tuple[str, ...]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)
    )
    return "\n".join([line(_HEADER), rule + "|", *(line(r) for r in body)])


def _attempt(a: Attempt) -> dict[str, Any]:
    return {
        "ok": a.ok,
        "seconds": round(a.seconds, 4),
        "peak_rss_mib": round(a.peak_rss_mib, 1),
        "returncode": a.returncode,
        "received": a.received,
        "expected": a.expected,
        "error": a.error,
    }


def _row(result: CaseResult, row: Row, reference: bool) -> dict[str, Any]:
    files, mbs = row.value(Metric.FILES_PER_S), row.value(Metric.MB_PER_S)
    return {
        "sender": row.sender.label,
        "kind": row.sender.kind.value,
        "associations": row.sender.associations,
        "ok": row.ok,
        "error": row.error,
        "seconds": round(row.seconds, 4) if row.ok else None,
        "files_per_s": round(files, 1) if files is not None else None,
        "mb_per_s": round(mbs, 2) if mbs is not None else None,
        "peak_rss_mib": round(row.peak_rss_mib, 1) if row.peak_rss_mib is not None else None,
        "ratio": None if reference else _round(result.ratio(row)),
        "met": None if reference else result.met(row),
        "received_matched": bool(row.attempts)
        and all(a.received >= a.expected for a in row.attempts),
        "attempts": [_attempt(a) for a in row.attempts],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def to_json(
    machine: dict[str, Any], settings: dict[str, Any], results: list[CaseResult]
) -> dict[str, Any]:
    cases = []
    for r in results:
        verdicts = [r.met(row) for row in r.contenders]
        cases.append(
            {
                "case": r.case.name,
                "description": r.case.description,
                "goal": {
                    "metric": r.case.goal.metric.value,
                    "min_ratio": r.case.goal.min_ratio,
                    "max_rss_mib": r.case.goal.max_rss_mib,
                    "text": r.case.goal.text(),
                },
                "storescp_tcp_nodelay": r.case.nodelay,
                "files": r.reference.files,
                "bytes": r.reference.nbytes,
                "load_average_before": round(r.load_before, 2),
                "met": any(v is True for v in verdicts),
                "best": r.best.sender.label if r.best is not None else None,
                "rows": [_row(r, r.reference, True)]
                + [_row(r, row, False) for row in r.contenders],
            }
        )
    return {"machine": machine, "settings": settings, "cases": cases}


def write(
    out: Path,
    machine: dict[str, Any],
    settings: dict[str, Any],
    results: list[CaseResult],
    table_text: str,
) -> None:
    data = to_json(machine, settings, results)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "results.md").write_text(f"{table_text}\n\n{footer(machine, settings, results)}\n")


def footer(machine: dict[str, Any], settings: dict[str, Any], results: list[CaseResult]) -> str:
    """What the table was measured on, and how busy the machine was."""
    loads = ", ".join(f"{r.case.name} {r.load_before:.2f}" for r in results)
    return (
        f"{machine['date']}, {machine['nproc']} CPUs ({machine['cpu']}), DCMTK "
        f"{machine['dcmtk']}, {machine['forwarder']}; {settings['statistic']}, scale "
        f"{settings['scale']:g}. Load average before each case: {loads}."
    )


def latency_lines(latencies: dict[str, Any]) -> str:
    """The latency case: one line per path, median and 90th percentile (goal: median <= 20 ms
    through the gateway, issue 13)."""
    lines = [f"latency, {latencies.get('objects')} objects one at a time into an idle gateway:"]
    for path, value in latencies.items():
        if isinstance(value, dict):
            lines.append(
                f"- {path}: median {value['median_ms']:.1f} ms, p90 {value['p90_ms']:.1f} ms"
            )
    return "\n".join(lines) + "\n(goal: median <= 20 ms from pushed or renamed in to stored)"
