"""The benchmark cases, their goals, and the records a run produces."""

from __future__ import annotations

import enum
import statistics
from dataclasses import dataclass

MB = 1_000_000
"""Throughput is in MB/s of file bytes (10^6 bytes); RSS is in MiB (2^20 bytes)."""


class Metric(enum.Enum):
    FILES_PER_S = "files/s"
    MB_PER_S = "MB/s"


class Statistic(enum.Enum):
    """How the repetitions of one sender become one number."""

    BEST = "best"  # shortest time: interference from other work only ever adds time
    MEDIAN = "median"


class Kind(enum.Enum):
    """How a sender is run."""

    STORESCU = "storescu"  # DCMTK storescu, the reference
    SEND = "send"  # forwarder send
    DAEMON = "daemon"  # forwarder run, files present in incoming at start
    STORESCP_OD = "storescp-od"  # receive cases: DCMTK storescp -od, the reference receiver
    RECEIVE = "receive"  # receive cases: forwarder receive (storescu pushes into both)
    STOW = "stow"  # forwarder send http://.../dicom-web (STOW-RS), beside SEND to the same peer
    # gateway cases (bench.gateway): storescu pushes through a gateway to the PACS
    GATEWAY = "gateway"  # forwarder run with listen:
    GATEWAY_STORESCP = "gateway-storescp"  # DCMTK storescp -od feeding forwarder run (comparison)
    ORTHANC_ROUTE = "orthanc-route"  # Orthanc, Lua OnStoredInstance -> SendToModality (comparison)
    GATEWAY_INPROC = "gateway-inproc"  # forwarder run, listen.separate_process: false (comparison)
    DAEMON_DISK = "daemon-disk"  # DAEMON with its folders and queue on disk, not tmpfs (comparison)
    # The receive and gateway cases on disk too: what fsync before Success costs on this disk
    # (issue 13: "the bench says what it costs"; storescp -od does not fsync).
    STORESCP_OD_DISK = "storescp-od-disk"  # STORESCP_OD writing to disk (comparison)
    RECEIVE_DISK = "receive-disk"  # RECEIVE writing to disk (comparison)
    GATEWAY_DISK = "gateway-disk"  # GATEWAY with its folders and queue on disk (comparison)


#: Rows shown beside forwarder's for comparison: no goal applies to them.
COMPARISON = frozenset(
    {
        Kind.GATEWAY_STORESCP,
        Kind.ORTHANC_ROUTE,
        Kind.GATEWAY_INPROC,
        Kind.DAEMON_DISK,
        Kind.STORESCP_OD_DISK,
        Kind.RECEIVE_DISK,
        Kind.GATEWAY_DISK,
    }
)


class Peer(enum.Enum):
    """Who receives."""

    STORESCP = "storescp"  # DCMTK storescp --ignore (bench.procs)
    ORTHANC = "orthanc"  # Orthanc with its DICOMweb plugin, C-STORE and STOW-RS (bench.orthanc)


@dataclass(frozen=True, slots=True)
class Goal:
    metric: Metric
    min_ratio: float
    max_rss_mib: float | None = None

    def text(self) -> str:
        rss = f", RSS <= {self.max_rss_mib:g} MiB" if self.max_rss_mib is not None else ""
        return f">= {self.min_ratio:g}x {self.metric.value}{rss}"


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    corpus: str  # which corpus (bench.corpus) it sends
    kind: Kind  # the forwarder side
    goal: Goal
    nodelay: bool  # TCP_NODELAY=1 for storescp and storescu; False = Nagle on, as shipped
    description: str
    peer: Peer = Peer.STORESCP
    modalities: int = 1  # gateway cases: storescu processes pushing at once, the corpus split


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case(
            "small", "small", Kind.SEND, Goal(Metric.FILES_PER_S, 1.0), True,
            "forwarder send, small files (~9 KB)",
        ),
        Case(
            "ct", "ct", Kind.SEND, Goal(Metric.MB_PER_S, 1.0), True,
            "forwarder send, CT files (~0.5 MB)",
        ),
        Case(
            "big", "big", Kind.SEND, Goal(Metric.MB_PER_S, 0.8, 64.0), True,
            "forwarder send, one multi-frame file (~500 MiB)",
        ),
        # Issue 13: "20,000 small files queued -> done/" and "500 CT files -> done/".
        Case(
            "daemon", "backlog", Kind.DAEMON, Goal(Metric.FILES_PER_S, 0.8), True,
            "daemon, 20,000 small files in incoming at start -> all in done/",
        ),
        Case(
            "daemon-ct", "ct", Kind.DAEMON, Goal(Metric.MB_PER_S, 1.0), True,
            "daemon, 500 CT files in incoming at start -> all in done/",
        ),
        Case(
            "nagle", "nagle", Kind.SEND, Goal(Metric.FILES_PER_S, 50.0), False,
            "small files to stock storescp (Nagle on); storescu as shipped",
        ),
        Case(
            "receive-small", "small", Kind.RECEIVE, Goal(Metric.FILES_PER_S, 1.0), True,
            "storescu pushing small files into forwarder receive vs storescp -od (tmpfs)",
        ),
        Case(
            "receive-ct", "ct", Kind.RECEIVE, Goal(Metric.MB_PER_S, 1.0), True,
            "storescu pushing CT files into forwarder receive vs storescp -od (tmpfs)",
        ),
        # Issue 19: STOW-RS to Orthanc against C-STORE to the same Orthanc. The goal applies to
        # every forwarder row (C-STORE and STOW-RS), against storescu into the same Orthanc.
        Case(
            "stow-small", "small", Kind.STOW, Goal(Metric.FILES_PER_S, 1.0), True,
            "small files (~9 KB) to Orthanc: C-STORE and STOW-RS", Peer.ORTHANC,
        ),
        Case(
            "stow-ct", "ct", Kind.STOW, Goal(Metric.MB_PER_S, 1.0), True,
            "CT files (~0.5 MB) to Orthanc: C-STORE and STOW-RS", Peer.ORTHANC,
        ),
        # Issue 13: storescu pushing to the PACS through a gateway, against pushing straight to
        # it (the reference row); the goal applies to the daemon's listener only.
        Case(
            "gateway-small", "small", Kind.GATEWAY, Goal(Metric.FILES_PER_S, 0.5), True,
            "storescu -> gateway -> PACS (storescp), small files, until the PACS has them all",
        ),
        Case(
            "gateway-ct", "ct", Kind.GATEWAY, Goal(Metric.MB_PER_S, 0.5), True,
            "storescu -> gateway -> PACS (storescp), CT files, until the PACS has them all",
        ),
        # Four modalities pushing at once (the corpus split four ways), straight to the PACS
        # and through the gateway, receiving in its own process (the default) and in the
        # daemon's: what the receiving process buys when associations run in parallel.
        Case(
            "gateway4-small", "small", Kind.GATEWAY, Goal(Metric.FILES_PER_S, 0.5), True,
            "4 storescu at once -> gateway -> PACS, small files", modalities=4,
        ),
        Case(
            "gateway4-ct", "ct", Kind.GATEWAY, Goal(Metric.MB_PER_S, 0.5), True,
            "4 storescu at once -> gateway -> PACS, CT files", modalities=4,
        ),
    )
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Sender:
    kind: Kind
    associations: int = 1

    @property
    def label(self) -> str:
        if self.kind is Kind.STORESCU:
            return "storescu"
        if self.kind is Kind.STORESCP_OD:
            return "storescp -od"
        if self.kind is Kind.RECEIVE:
            return "forwarder receive"
        if self.kind is Kind.STORESCP_OD_DISK:
            return "storescp -od (on disk)"
        if self.kind is Kind.RECEIVE_DISK:
            return "forwarder receive (on disk)"
        if self.kind is Kind.GATEWAY_DISK:
            return "via forwarder run (listen, on disk)"
        if self.kind is Kind.STOW:
            return f"forwarder send STOW-RS -a{self.associations}"
        if self.kind is Kind.GATEWAY:
            return "via forwarder run (listen)"
        if self.kind is Kind.GATEWAY_INPROC:
            return "via forwarder run (listen, 1 process)"
        if self.kind is Kind.GATEWAY_STORESCP:
            return "via storescp + forwarder run"
        if self.kind is Kind.ORTHANC_ROUTE:
            return "via Orthanc (Lua routing)"
        if self.kind is Kind.DAEMON_DISK:
            return f"forwarder run -a{self.associations} (on disk)"
        name = "forwarder send" if self.kind is Kind.SEND else "forwarder run"
        return f"{name} -a{self.associations}"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One timed run of one sender over one corpus."""

    ok: bool
    seconds: float
    peak_rss_mib: float
    returncode: int | None
    received: int  # C-STORE requests storescp logged during this run
    expected: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """All attempts of one sender in one case, and the derived numbers: time by ``statistic``
    over the attempts, peak RSS the maximum of all attempts."""

    sender: Sender
    files: int
    nbytes: int
    attempts: tuple[Attempt, ...]
    statistic: Statistic
    unavailable: str | None = None  # the sender could not even be started (no such command)

    @property
    def ok(self) -> bool:
        return self.unavailable is None and bool(self.attempts) and all(a.ok for a in self.attempts)

    @property
    def error(self) -> str | None:
        if self.unavailable is not None:
            return self.unavailable
        return next((a.error for a in self.attempts if not a.ok), None)

    @property
    def seconds(self) -> float:
        times = [a.seconds for a in self.attempts]
        return min(times) if self.statistic is Statistic.BEST else statistics.median(times)

    def value(self, metric: Metric) -> float | None:
        if not self.ok:
            return None
        if metric is Metric.FILES_PER_S:
            return self.files / self.seconds
        return self.nbytes / MB / self.seconds

    @property
    def peak_rss_mib(self) -> float | None:
        return max(a.peak_rss_mib for a in self.attempts) if self.ok else None


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    reference: Row  # storescu
    contenders: tuple[Row, ...]  # forwarder variants
    load_before: float  # 1-minute load average when the case started (noise indicator)

    def ratio(self, row: Row) -> float | None:
        ours, ref = row.value(self.case.goal.metric), self.reference.value(self.case.goal.metric)
        if ours is None or ref is None or ref == 0:
            return None
        return ours / ref

    def met(self, row: Row) -> bool | None:
        """None when it cannot be judged (a sender failed, or a comparison row); the goal
        applies to forwarder rows."""
        if row.sender.kind in COMPARISON:
            return None
        ratio = self.ratio(row)
        if ratio is None:
            return None
        limit = self.case.goal.max_rss_mib
        rss = row.peak_rss_mib
        return ratio >= self.case.goal.min_ratio and (limit is None or (rss or 0.0) <= limit)

    @property
    def best(self) -> Row | None:
        """The forwarder variant with the highest goal metric."""
        good = [r for r in self.contenders if r.ok and r.sender.kind not in COMPARISON]
        return max(good, key=lambda r: r.value(self.case.goal.metric) or 0.0, default=None)
