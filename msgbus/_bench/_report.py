"""Reporting a session: a plain table of median [min-max] per contender, with the URL's secrets redacted."""

from __future__ import annotations

from typing import Any


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def _redacted(url: str) -> str:
    try:
        from .._url import parse_url

        return parse_url(url).redacted
    except Exception:  # fail closed: a URL that does not parse may hold a password anywhere
        return url.split("://", 1)[0] + "://..."


def render_text(result: dict[str, Any]) -> str:
    """A plain table of one session: median [min-max] per contender."""
    names = list(result["contenders"])
    names += [n for n in dict.fromkeys(f["contender"] for f in result["figures"]) if n not in names]  # ordering's
    lines = [f"{result['url']}  ({result.get('server_version') or 'embedded'})"]
    header = f"{'workload':10} {'case':34}" + "".join(f"{n:>26}" for n in names)
    lines.append(header)
    rows: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for f in result["figures"]:
        rows.setdefault((f["workload"], f["case"], f["unit"]), {})[f["contender"]] = f
    for (workload, case, unit), by in rows.items():
        cells = []
        for n in names:
            f = by.get(n)
            cells.append(f"{_fmt(f['median'])} [{_fmt(f['min'])}-{_fmt(f['max'])}]" if f and f.get("runs") else "-")
        lines.append(f"{workload:10} {case + ' (' + unit + ')':34}" + "".join(f"{c:>26}" for c in cells))
    lines += [f"not measured: {text}" for text in result.get("skipped", [])]
    lines.append(f"load average {result['machine']['loadavg_start']} -> {result['machine']['loadavg_end']}")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
