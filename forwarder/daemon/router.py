"""Routes: which destinations a file goes to, from its header and the sub-folder it arrived in.

Every matching route applies (fan-out); no routes at all means every file goes to every
destination. A route's conditions (:mod:`forwarder.daemon.conditions`: values, wildcards,
regex, not, present, range) must all hold. ``folder`` matches the file's path relative to the
incoming folder (``ct/*`` matches ``ct/a.dcm`` and ``ct/x/b.dcm``) or its folder (``ct``).
``calling_ae`` matches the AE title a file came in with through ``listen`` (a pseudo-key fed from
the file's origin, not its header); a file from the watch folder has none and never matches it
(``not`` and ``present: false`` hold for it).

``action: discard`` routes: a file that any discard route matches is sent nowhere, whatever send
routes match it too (a discard route is how an administrator says "never forward these", e.g.
test patients or KO/PR objects, above broad send routes); it goes to done/ with a log line naming
the route. :meth:`Router.plan` says all of this for one file, route by route, which is what
ingest acts on and ``forwarder explain`` prints.

A route's ``priority`` goes with the file to each of its destinations (:meth:`Plan.ranked`;
the highest wins when routes overlap).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forwarder.config import Route
from forwarder.config.routing import CALLING_AE, FOLDER, Action, Deidentify, Modify
from forwarder.daemon.conditions import Condition, Not, condition
from forwarder.queue import NORMAL_RANK, PRIORITY_RANK

if TYPE_CHECKING:
    from forwarder.dicom.deidentify import UidSource
    from forwarder.dicom.edit import Editor

_PSEUDO_KEYS = (FOLDER, CALLING_AE)


@dataclass(frozen=True, slots=True)
class Rule:
    """One configured route, its conditions built."""

    name: str
    conditions: tuple[Condition, ...]
    to: tuple[str, ...]
    discard: bool
    route: Route | None  # the config it came from (None: the implicit every-destination rule)
    # Derived from ``route`` once (they are asked for every file):
    # what this route changes in what it sends (equal keys: the same changes),
    edit_key: tuple[Any, ...] = field(init=False, compare=False, repr=False)
    # its priority (``urgent``, ``normal`` or ``low``; issue 16),
    priority: str = field(init=False, compare=False, repr=False)
    # and that priority as the queue orders claims (PRIORITY_RANK: 0 urgent).
    rank: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        route = self.route
        edit_key: tuple[Any, ...] = ()
        if route is not None:
            modify = route.modify if route.modify and not route.modify.empty else None
            edit_key = (modify, route.deidentify)
        value = getattr(route, "priority", None) if route is not None else None
        priority = str(getattr(value, "value", value) or "normal")
        object.__setattr__(self, "edit_key", edit_key)
        object.__setattr__(self, "priority", priority)
        object.__setattr__(self, "rank", PRIORITY_RANK.get(priority, NORMAL_RANK))


@dataclass(frozen=True, slots=True)
class Failure:
    """The first condition of a route that does not hold for a file."""

    key: str
    expected: str
    actual: str | None  # None: the file does not have the attribute


@dataclass(frozen=True, slots=True)
class Verdict:
    rule: Rule
    failure: Failure | None

    @property
    def matched(self) -> bool:
        return self.failure is None


@dataclass(frozen=True, slots=True)
class Plan:
    """What happens to one file: its destinations (config order), the discard routes that
    matched it (then no destination), and every route's verdict."""

    destinations: tuple[str, ...]
    discarded_by: tuple[str, ...]
    verdicts: tuple[Verdict, ...]

    def ranked(self) -> dict[str, int]:
        """Destination -> priority rank, in config order: when several matching routes send
        the file to one destination, the highest priority (lowest rank) wins."""
        return {d: min(r.rank for r in self.routes_to(d)) for d in self.destinations}

    def routes_to(self, destination: str) -> tuple[Rule, ...]:
        """The matching send routes that send the file to ``destination``."""
        if self.discarded_by:
            return ()
        return tuple(
            v.rule
            for v in self.verdicts
            if v.matched and not v.rule.discard and destination in v.rule.to
        )


@dataclass(frozen=True, slots=True)
class Edits:
    """The changes made to a file sent to one destination: the steps in order (a label such
    as ``route research: modify`` and its editor), or the conflict that forbids sending."""

    destination: str
    steps: tuple[tuple[str, Editor], ...]
    conflict: str | None = None

    @property
    def editors(self) -> tuple[Editor, ...]:
        return tuple(e for _, e in self.steps)


class Router:
    """Decides the destinations of a file. Immutable; build a new one on reload."""

    def __init__(
        self,
        routes: Sequence[Route] | None,
        destinations: Sequence[str],
        modify: Mapping[str, Modify | None] | None = None,
        uids: UidSource | None = None,
    ) -> None:
        self._all = tuple(destinations)
        # Jobs queued before this time may have been routed by other routes: they are routed
        # again before they are sent (forwarder.daemon.edits). At start: the jobs of an
        # earlier run; on a reload that changed the routes, see :meth:`after` and :meth:`settle`.
        self._settled: float | None = time.time()
        self._uids = uids  # the UID map deidentify uses (the queue's)
        self._routes = None if routes is None else tuple(routes)
        self._modify = {k: v for k, v in (modify or {}).items() if v is not None and not v.empty}
        self.configured = routes is not None
        if routes is None:
            self.rules: tuple[Rule, ...] = (Rule("(all)", (), self._all, False, None),)
        else:
            self.rules = tuple(
                Rule(
                    r.name,
                    tuple(condition(k, v) for k, v in r.match.items()),
                    tuple(r.to),
                    r.action is Action.DISCARD,
                    r,
                )
                for r in routes
            )
        self._may_edit: dict[str, bool] = {}
        self._may_edit = {d: self.may_edit(d) for d in self._all}

    def after(self, old: Router) -> Router:
        """This router, replacing ``old`` on a reload: with ``old``'s time when the routes
        and changes are the same and ``old`` was settled (nothing queued needs routing again),
        else unsettled: every job is routed again before it is sent until :meth:`settle`."""
        same = (self._routes, self._modify) == (old._routes, old._modify)
        self._settled = old._settled if same else None
        return self

    @property
    def settled(self) -> bool:
        """Every process that queues files routes with this router (:meth:`settle`)."""
        return self._settled is not None

    def settle(self) -> None:
        """Every process that queues files now routes with this router, and has finished what
        it routed with earlier ones: jobs queued from now on need not be routed again. The
        daemon calls it once each has said so (:mod:`forwarder.daemon.routes_in_use`)."""
        if self._settled is None:
            self._settled = time.time()

    def routed_again(self, created_at: float) -> bool:
        """Whether a job queued at ``created_at`` may have been routed by other routes (it is
        then routed again before it is sent)."""
        settled = self._settled
        return self.configured and (settled is None or created_at < settled)

    def __reduce__(self) -> tuple[type[Router], tuple[Any, ...]]:
        # Pickled for the receiving process (listen_child), which routes and checks for
        # conflicts but never edits: without the UID map, which is the daemon's queue.
        return Router, (self._routes, self._all, self._modify)

    @property
    def keywords(self) -> frozenset[str]:
        """The keys the routes look at besides ``folder`` (ingest reads these from the
        header; a key that is not a DICOM keyword must come from elsewhere)."""
        return frozenset(
            c.key for rule in self.rules for c in rule.conditions if c.key not in _PSEUDO_KEYS
        )

    def plan(self, header: Mapping[str, str], rel_path: str, calling_ae: str | None = None) -> Plan:
        """Every route's verdict for a file, and what follows. ``calling_ae``: the AE title it
        was received from through ``listen`` (None: the watch folder)."""
        folder = rel_path.rpartition("/")[0]
        verdicts = []
        for rule in self.rules:
            failure = None
            for cond in rule.conditions:
                if cond.key == FOLDER:
                    tests = (cond.holds(rel_path), cond.holds(folder))
                    ok = all(tests) if isinstance(cond, Not) else any(tests)
                    actual: str | None = rel_path
                elif cond.key == CALLING_AE:
                    actual = calling_ae or None
                    ok = cond.holds(actual)
                else:
                    actual = header.get(cond.key)
                    ok = cond.holds(actual)
                if not ok:
                    failure = Failure(cond.key, cond.expected(), actual)
                    break
            verdicts.append(Verdict(rule, failure))
        discarded = tuple(v.rule.name for v in verdicts if v.matched and v.rule.discard)
        chosen: set[str] = set()
        if not discarded:
            for v in verdicts:
                if v.matched:
                    chosen.update(v.rule.to)
        return Plan(tuple(d for d in self._all if d in chosen), discarded, tuple(verdicts))

    def may_edit(self, destination: str) -> bool:
        """Whether a file sent to ``destination`` may be changed (when not, its header need
        not be read again when it is sent)."""
        known = self._may_edit.get(destination)
        if known is not None:
            return known
        return destination in self._modify or any(
            destination in r.to and any(r.edit_key) for r in self.rules if not r.discard
        )

    def edits(self, plan: Plan, destination: str) -> Edits:
        """The changes for the file of ``plan`` sent to ``destination``: the matching routes'
        (``deidentify`` then ``modify``), then the destination's own ``modify``. Matching
        routes that send it there with different changes are a conflict, never a pick."""
        conflict = self.conflict(plan, destination)
        if conflict is not None:
            return Edits(destination, (), conflict)
        from forwarder.dicom.edit import Modification  # pydicom: only when there are changes

        steps: list[tuple[str, Editor]] = []
        rules = plan.routes_to(destination)
        rule = rules[0] if rules else None
        if rule is not None and rule.route is not None:
            deid = rule.route.deidentify
            if deid is not None:
                label = f"route {rule.name}: deidentify"
                if deid.options:  # explain names the options whose changes it lists
                    label += f" ({deid.profile} + {' + '.join(deid.options)})"
                steps.append((label, self._deidentifier(deid)))
            if rule.route.modify is not None and not rule.route.modify.empty:
                steps.append(
                    (f"route {rule.name}: modify", Modification.from_config(rule.route.modify))
                )
        own = self._modify.get(destination)
        if own is not None:
            steps.append((f"destination {destination}: modify", Modification.from_config(own)))
        return Edits(destination, tuple(steps))

    def conflict(self, plan: Plan, destination: str) -> str | None:
        """Why the file of ``plan`` cannot be sent to ``destination``: matching routes that
        send it there with different changes (None: no conflict)."""
        rules = plan.routes_to(destination)
        keys: list[tuple[Any, ...]] = []  # config models are not hashable: compared with ==
        for r in rules:
            if r.edit_key not in keys:
                keys.append(r.edit_key)
        if len(keys) <= 1:
            return None
        names = ", ".join(r.name for r in rules)
        return (
            f"routes {names} send it to {destination} with different changes "
            "(modify/deidentify); give them the same changes or put them on the destination"
        )

    def _deidentifier(self, config: Deidentify) -> Editor:
        from forwarder.dicom.deidentify import Deidentifier

        if self._uids is None:
            raise ValueError("a router that de-identifies needs a UID map")
        return Deidentifier(frozenset(config.options), self._uids)

    def route_ranked(
        self, header: Mapping[str, str], rel_path: str, calling_ae: str | None = None
    ) -> dict[str, int]:
        """Destination name -> priority rank for a file (:meth:`Plan.ranked`)."""
        return self.plan(header, rel_path, calling_ae).ranked()

    def route(
        self, header: Mapping[str, str], rel_path: str, calling_ae: str | None = None
    ) -> list[str]:
        """Destination names for a file, in config order, without duplicates (none when a
        discard route matches it)."""
        return list(self.plan(header, rel_path, calling_ae).destinations)
