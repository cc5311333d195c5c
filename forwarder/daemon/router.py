"""Routes: which destinations a file goes to, from its header and the sub-folder it arrived in.

Every matching route applies (fan-out); no routes at all means every file goes to every
destination. A condition is a DICOM keyword mapped to a value, a list of values, or ``*``/``?``
wildcards; all conditions of a route must match. ``folder`` matches the file's path relative to
the incoming folder (``ct/*`` matches ``ct/a.dcm`` and ``ct/x/b.dcm``) or its folder (``ct``).
``calling_ae`` matches the AE title a file came in with through ``listen`` (a pseudo-key fed from
the file's origin, not its header); a file from the watch folder has none and never matches it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from forwarder.config import Route

FOLDER = "folder"
CALLING_AE = "calling_ae"
_PSEUDO_KEYS = (FOLDER, CALLING_AE)


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    conditions: tuple[tuple[str, tuple[str, ...]], ...]
    to: tuple[str, ...]


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
                rules.append(_Rule(r.name, conds, tuple(r.to)))
            self._rules = tuple(rules)

    @property
    def keywords(self) -> frozenset[str]:
        """The DICOM keywords the routes look at (ingest reads these from the header)."""
        if self._rules is None:
            return frozenset()
        return frozenset(
            k for rule in self._rules for k, _ in rule.conditions if k not in _PSEUDO_KEYS
        )

    def route(
        self, header: Mapping[str, str], rel_path: str, calling_ae: str | None = None
    ) -> list[str]:
        """Destination names for a file, in config order, without duplicates. ``calling_ae``:
        the AE title it was received from through ``listen`` (None: the watch folder)."""
        if self._rules is None:
            return list(self._all)
        folder = rel_path.rpartition("/")[0]
        chosen: dict[str, None] = {}
        for rule in self._rules:
            ok = True
            for key, patterns in rule.conditions:
                if key == FOLDER:
                    ok = _matches(rel_path, patterns) or _matches(folder, patterns)
                elif key == CALLING_AE:
                    ok = _matches(calling_ae, patterns)
                else:
                    ok = _matches(header.get(key), patterns)
                if not ok:
                    break
            if ok:
                chosen.update(dict.fromkeys(rule.to))
        return [d for d in self._all if d in chosen]
