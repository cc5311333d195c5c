"""The status page's search box: the keys a query gives, and the HTML of a search's answer.

``/?find=KEY`` shows, above the status, what ``/api/find?key=KEY`` returns
(:func:`~forwarder.daemon.status.find_document`, the document ``forwarder find --json``
prints): one row per file with where it is now, the keys it matched, its UIDs and its state per
destination. Every value is escaped; an Accession Number appears only as the key typed (the
document holds it nowhere else).

Not here: serving it (:mod:`forwarder.daemon.status_page`) and the lookup
(:meth:`forwarder.queue.Queue.find`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

from forwarder.daemon.status import job_summary, origin_text

MAX_KEYS = 20  # keys one search takes (more are ignored)
MAX_FOUND_SHOWN = 500  # files the page lists for one search (/api/find returns them all)


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def search_keys(values: Sequence[str]) -> list[str]:
    """The keys of a query: each value split on spaces and commas, without duplicates."""
    keys = [k for v in values for k in v.replace(",", " ").split()]
    return list(dict.fromkeys(keys))[:MAX_KEYS]


@dataclass(frozen=True, slots=True)
class Search:
    """What the page's search box was given, and ``/api/find``'s document for it (None: no
    key was given)."""

    keys: tuple[str, ...]
    found: dict[str, Any] | None


def search_form(search: Search | None) -> str:
    """The GET form on ``/``, holding the keys of ``search``."""
    value = " ".join(search.keys) if search is not None else ""
    focus = " autofocus" if search is not None else ""
    return (
        '<form method="get" action="/" class="find"><label>Find '
        f'<input type="search" name="find" value="{_e(value)}" size="70"{focus} '
        'placeholder="Study, Series or SOP Instance UID, or Accession Number"></label> '
        '<button type="submit">Find</button></form>'
    )


def _found_rows(files: list[dict[str, Any]]) -> str:
    rows = []
    for f in files[:MAX_FOUND_SHOWN]:
        matched = ", ".join(f"{_e(m['as'])} <code>{_e(m['key'])}</code>" for m in f["matched"])
        uids = "".join(
            f'<div><span class="since">{label}</span> <code>{_e(f[key])}</code></div>'
            for label, key in (
                ("SOP Instance", "sop_instance_uid"),
                ("Series", "series_instance_uid"),
                ("Study", "study_instance_uid"),
            )
            if f.get(key)
        )
        jobs = "".join(
            f"<li><b>{_e(d['destination'])}</b>: {_e(job_summary(d))}</li>"
            for d in f["destinations"]
        )
        received = origin_text(f.get("origin"))
        origin = f'<div class="since">{_e(received)}</div>' if received else ""
        retried = (
            f'<div class="since">queued again as file {_e(f["retried_as"])}</div>'
            if f.get("retried_as") is not None
            else ""
        )
        rows.append(
            "<tr>"
            f"<td><code>{_e(f['rel_path'])}</code>"
            f'<div class="since">file {_e(f["file_id"])}, queued {_e(f["queued_at"])}</div></td>'
            f"<td><b>{_e(f['where'])}</b><div><code>{_e(f['path'])}</code></div>{origin}{retried}"
            "</td>"
            f"<td>{matched}</td><td>{uids}</td>"
            f"<td>{f'<ul>{jobs}</ul>' if jobs else '-'}</td>"
            "</tr>"
        )
    return "\n".join(rows)


def search_section(search: Search) -> str:
    """The answer to ``search``: a table of the files found, or why there is none."""
    if search.found is None:
        return '<section><h2>Find</h2><p class="none">Give a key to find.</p></section>'
    files = search.found["files"]
    keys = ", ".join(f"<code>{_e(k)}</code>" for k in search.keys)
    parts = [f"<section><h2>Found {len(files)} file{'' if len(files) == 1 else 's'}</h2>"]
    parts.append(f'<p class="meta">for {keys} · <a href="/">back to the status page</a></p>')
    if files:
        parts.append(
            "<table><thead><tr><th>File</th><th>Where</th><th>Matched</th><th>UIDs</th>"
            "<th>Per destination</th></tr></thead><tbody>" + _found_rows(files) + "</tbody></table>"
        )
        if len(files) > MAX_FOUND_SHOWN:
            parts.append(
                f'<p class="meta">The first {MAX_FOUND_SHOWN} are shown: '
                "<code>forwarder find</code> or /api/find lists them all.</p>"
            )
    else:
        parts.append(
            '<p class="none">The queue knows no file of this (never queued, or pruned).</p>'
        )
    return "".join(parts) + "</section>"
