"""What the daemon would do with a file, route by route, without doing it (``forwarder explain``).

For each file: the header values are read by the same check ingest makes, every route is
evaluated (matched, or the first condition that failed with the value the file has), and for
each destination the changes that would be sent (old -> new) are worked out by applying the
same editors to the object in memory. Nothing is sent, nothing is written: no network, no queue.
The result is one JSON-able document per file; :mod:`forwarder.cli.explain` prints it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from forwarder.config import Config
from forwarder.daemon.ingest import header_tags
from forwarder.daemon.listen_sink import ae_from_folder
from forwarder.daemon.router import Router
from forwarder.daemon.spool import LISTEN_PREFIX
from forwarder.dicom.check import check_file_values
from forwarder.errors import InvalidFileError, UnreadableFileError

_RANK = {"urgent": 0, "normal": 1, "low": 2}


class PreviewUids:
    """De-identification's UID map for explain: new UIDs made in memory, never stored (the
    daemon's own map, in the queue, may already hold other ones for these UIDs)."""

    def __init__(self) -> None:
        self._made: dict[str, str] = {}

    def replacement_uids(self, originals: Iterable[str]) -> dict[str, str]:
        wanted = list(originals)
        for uid in wanted:
            self._made.setdefault(uid, f"2.25.{uuid.uuid4().int}")
        return {uid: self._made[uid] for uid in wanted}


def router_for(config: Config) -> Router:
    return Router(
        config.routes,
        [d.name for d in config.destinations],
        {d.name: d.modify for d in config.destinations},
        PreviewUids(),
    )


def rel_path_for(path: Path, incoming: Path) -> str:
    """The path ``folder`` conditions see: relative to incoming when the file is under it,
    else its name (a file about to be dropped at the top of incoming)."""
    try:
        return path.resolve().relative_to(incoming.resolve()).as_posix()
    except ValueError:
        return path.name


def explain_file(path: Path, config: Config, router: Router) -> dict[str, Any]:
    """The document for one file: ``outcome`` is ``send``, ``discard``, ``no route``,
    ``conflict`` or ``error`` (not readable or not usable DICOM: ``error`` says why)."""
    rel = rel_path_for(path, config.incoming)
    calling_ae = None
    if rel.startswith(LISTEN_PREFIX):
        # Received through `listen`: routed with the calling AE title its folder names and
        # its path without `.listen/` (as Listener.recover reads them back).
        rel = rel[len(LISTEN_PREFIX) :]
        folder, _, rest = rel.partition("/")
        calling_ae = ae_from_folder(folder) if rest else None
    doc: dict[str, Any] = {"file": str(path), "rel_path": rel}
    if calling_ae is not None:
        doc["calling_ae"] = calling_ae
    want, vrs = header_tags(router)
    try:
        meta, values = check_file_values(str(path), want, vrs)
    except (InvalidFileError, UnreadableFileError) as exc:
        return {**doc, "outcome": "error", "error": f"not usable DICOM: {exc.reason}"}
    plan = router.plan(values, rel, calling_ae)
    doc["sop_instance_uid"] = meta.sop_instance_uid
    doc["routes"] = [
        {
            "route": v.rule.name,
            "action": "discard" if v.rule.discard else "send",
            "matched": v.matched,
            "failed": None
            if v.failure is None
            else {
                "key": v.failure.key,
                "expected": v.failure.expected,
                "actual": v.failure.actual,
            },
            "to": list(v.rule.to),
            "priority": v.rule.priority,
        }
        for v in plan.verdicts
        if router.configured
    ]
    doc["discarded_by"] = list(plan.discarded_by)
    dests = []
    for name in plan.destinations:
        rules = plan.routes_to(name)
        priority = min((r.priority for r in rules), key=lambda p: _RANK.get(p, 1), default="normal")
        entry: dict[str, Any] = {
            "destination": name,
            "priority": priority,
            "routes": [r.name for r in rules],
        }
        entry.update(_changes(path, router, plan, name))
        dests.append(entry)
    doc["destinations"] = dests
    if plan.discarded_by:
        doc["outcome"] = "discard"
    elif not dests:
        doc["outcome"] = "no route"
    elif any(d["conflict"] for d in dests):
        doc["outcome"] = "conflict"
    else:
        doc["outcome"] = "send"
    return doc


def _changes(path: Path, router: Router, plan: Any, destination: str) -> dict[str, Any]:
    if not router.may_edit(destination):
        return {"steps": [], "changes": [], "conflict": None, "error": None}
    edits = router.edits(plan, destination)
    out: dict[str, Any] = {
        "steps": [label for label, _ in edits.steps],
        "changes": [],
        "conflict": edits.conflict,
        "error": None,
    }
    if edits.conflict is None and edits.steps:
        from forwarder.dicom.edit import EditError, edit_file

        try:
            obj = edit_file(str(path), edits.editors)
        except (EditError, InvalidFileError) as exc:
            out["error"] = f"cannot apply the changes: {exc}"
        else:
            out["changes"] = [c.to_json() for c in obj.changes]
    return out
