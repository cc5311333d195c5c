"""Routes: which destinations a file goes to, from its header and the sub-folder it arrived in.

Every matching route applies (fan-out); no routes at all means every file goes to every
destination. A condition is a DICOM keyword mapped to a value, a list of values, or ``*``/``?``
wildcards; all conditions of a route must match. ``folder`` matches the file's path relative to
the incoming folder (``ct/*`` matches ``ct/a.dcm`` and ``ct/x/b.dcm``) or its folder (``ct``).
A route's ``priority`` goes with the file to each of its destinations
(:meth:`Router.route_ranked`; the highest wins when routes overlap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from forwarder.config import Route
from forwarder.queue import NORMAL_RANK, PRIORITY_RANK

FOLDER = "folder"


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    conditions: tuple[tuple[str, tuple[str, ...]], ...]
    to: tuple[str, ...]
    rank: int = NORMAL_RANK  # the route's priority (PRIORITY_RANK: 0 urgent)


def _matches(value: str | None, patterns: tuple[str, ...]) -> bool:
    if value is None:
        return False
    # Multi-valued elements (ImageType ORIGINAL\PRIMARY) match on any value or the whole.
    candidates = [value, *value.split("\\")] if "\\" in value else [value]
    return any(fnmatchcase(c.strip(), p) for c in candidates for p in patterns)


class Router:
    """Decides the destinations of a file. Immutable; build a new one on reload."""

    def __init__(self, routes: Sequence[Route] | None, destinations: Sequence[str]) -> None:
        self._all = tuple(destinations)
        self._rules: tuple[_Rule, ...] | None = None
        if routes is not None:
            rules = []
            for r in routes:
                conds = tuple(
                    (key, tuple(v) if isinstance(v, list) else (v,)) for key, v in r.match.items()
                )
                rules.append(_Rule(r.name, conds, tuple(r.to), PRIORITY_RANK[r.priority]))
            self._rules = tuple(rules)

    @property
    def keywords(self) -> frozenset[str]:
        """The DICOM keywords the routes look at (ingest reads these from the header)."""
        if self._rules is None:
            return frozenset()
        return frozenset(k for rule in self._rules for k, _ in rule.conditions if k != FOLDER)

    def route(self, header: Mapping[str, str], rel_path: str) -> list[str]:
        """Destination names for a file, in config order, without duplicates."""
        return list(self.route_ranked(header, rel_path))

    def route_ranked(self, header: Mapping[str, str], rel_path: str) -> dict[str, int]:
        """Destination name -> priority rank for a file, in config order: when several routes
        send it to one destination, the highest priority (lowest rank) wins."""
        if self._rules is None:
            return dict.fromkeys(self._all, NORMAL_RANK)
        folder = rel_path.rpartition("/")[0]
        chosen: dict[str, int] = {}
        for rule in self._rules:
            ok = True
            for key, patterns in rule.conditions:
                if key == FOLDER:
                    ok = _matches(rel_path, patterns) or _matches(folder, patterns)
                else:
                    ok = _matches(header.get(key), patterns)
                if not ok:
                    break
            if ok:
                for name in rule.to:
                    chosen[name] = min(chosen.get(name, rule.rank), rule.rank)
        return {d: chosen[d] for d in self._all if d in chosen}
