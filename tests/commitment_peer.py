"""A scripted Storage SCP and Storage Commitment SCP (pynetdicom) for the commitment tests.

It stores what it is sent (in memory, by SOP Instance UID) and answers each N-ACTION by
committing the instances it holds and failing the others (0x0112), unless the test scripts it
otherwise: report on the same association or on a new one to ``report_to``, not at all, late
(``delay``, or held until the test sets ``hold_report``),
for another transaction, or naming an instance nobody asked about. It also answers C-FIND at
IMAGE level (Study Root) from what it holds (``find_fails``: ending with a failure status
instead, for chosen instances). ``hang``: accept the association, then never
answer an N-ACTION or a C-FIND (until the test sets ``hang = False`` or stops the peer);
``hang_associate``: never answer an A-ASSOCIATE-RQ (the TCP connection is accepted).
``kill``: reset or close the connection instead of answering an N-ACTION or a C-FIND;
``kill_release``: instead of answering the requestor's A-RELEASE-RQ.
``ssl_context``: DICOM TLS (a server context); set another on a running peer (:meth:`use_tls`)
and the next connections are handshaken with it (a PACS whose trust changed).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from peers import free_port, start_server
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    build_role,
    evt,
)
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.status import code_to_category

SC = "1.2.840.10008.1.20.1"
SC_INSTANCE = "1.2.840.10008.1.20.1.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
_ACCEPTED = ("Success", "Warning")


@dataclass
class CommitmentSCP:
    ae_title: str = "PACS"
    mode: str = "same"  # "same", "new" (to report_to), "none"
    report_to: tuple[str, int, str] | None = None  # (host, port, AE title) for mode "new"
    delay: float = 0.0  # before the report
    hold_report: threading.Event | None = None  # when given, the report waits until it is set
    forget: set[str] = field(default_factory=set)  # held, but reported failed (0x0110)
    wrong_transaction: bool = False  # report under another Transaction UID
    extra_instance: bool = False  # the report also names an instance nobody asked about
    action_status: int = 0x0000  # a Warning status is answered, and the report sent all the same
    # SOP Instance UIDs whose N-ACTION (any naming one of them) is answered refuse_status
    refuse_instances: set[str] = field(default_factory=set)
    refuse_status: int = 0x0110
    hang: bool = False  # never answer N-ACTION / C-FIND while set
    hang_associate: bool = False  # never answer an A-ASSOCIATE-RQ while set
    # "reset" (SO_LINGER 0) or "close": end the connection instead of answering an N-ACTION
    # or a C-FIND, while set
    kill: str | None = None
    kill_release: str | None = None  # "reset" or "close" instead of answering an A-RELEASE-RQ
    # their threads (reactor, DUL), as (ident, name)
    killed: list[tuple[tuple[int, str], tuple[int, str]]] = field(default_factory=list)
    # the threads (reactor, DUL) of every association that asked something, as (ident, name)
    threads: set[tuple[int | None, str]] = field(default_factory=set)
    abort_after_action: bool = False  # abort the association once the N-ACTION-RSP is out
    kill_after_action: str | None = None  # "reset" or "close" it then, instead
    aborted_after_action: int = 0  # how many associations that abort ended
    hung_associations: int = 0  # how many A-ASSOCIATE-RQs were left unanswered
    finds: list[str] = field(default_factory=list)  # SOP Instance UID of every C-FIND
    find_fails: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> its C-FIND's
    # final status (a failure), after the match when the instance is held
    held: dict[str, Dataset] = field(default_factory=dict)
    stores: list[str] = field(default_factory=list)  # every SOP Instance stored, in order
    actions: list[Dataset] = field(default_factory=list)
    report_statuses: list[int] = field(default_factory=list)
    report_endings: list[str] = field(default_factory=list)  # "released" / "aborted", mode new
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    # (n, context): once n instances are stored, use_tls(context), before the n-th store is
    # answered (so before anything the sender does after that store)
    tls_after_stores: tuple[int, ssl.SSLContext] | None = None
    _server: Any = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def _hang(self) -> None:
        while self.hang and not self._stopping.wait(0.05):
            pass

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.held[str(ds.SOPInstanceUID)] = ds
            self.stores.append(str(ds.SOPInstanceUID))
            switch = self.tls_after_stores
            if switch is not None and len(self.stores) == switch[0]:
                self.use_tls(switch[1])
        return 0x0000

    def _report(self, action: Dataset) -> tuple[int, Dataset]:
        out = Dataset()
        out.TransactionUID = "1.2.3.999" if self.wrong_transaction else action.TransactionUID
        ok, bad = [], []
        for ref in action.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            uid = str(ref.ReferencedSOPInstanceUID)
            with self._lock:
                held = uid in self.held
            if held and uid not in self.forget:
                ok.append(item)
            else:
                item.FailureReason = 0x0112 if not held else 0x0110
                bad.append(item)
        if self.extra_instance:
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
            item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
            ok.append(item)
        if ok:
            out.ReferencedSOPSequence = ok
        if bad:
            out.FailedSOPSequence = bad
        return (2 if bad else 1), out

    def _kill(self, event: Any) -> bool:
        """End the association's connection under the requestor (``kill``); True if done."""
        if self.kill is None:
            return False
        self._kill_now(event.assoc, self.kill)
        return True

    def _kill_now(self, assoc: Any, how: str) -> None:
        with self._lock:
            self.killed.append(((assoc.ident, assoc.name), (assoc.dul.ident, assoc.dul.name)))
        end_connection(assoc.dul.socket.socket, how)

    def _seen(self, assoc: Any) -> None:
        with self._lock:
            self.threads |= {(assoc.ident, assoc.name), (assoc.dul.ident, assoc.dul.name)}

    def _received(self, event: Any) -> None:
        self._seen(event.assoc)
        if self.kill_release is not None and isinstance(event.pdu, A_RELEASE_RQ):
            self._kill_now(event.assoc, self.kill_release)

    def _action(self, event: Any) -> tuple[int, None]:
        action = event.action_information
        with self._lock:
            self.actions.append(action)
        if self._kill(event):
            return 0x0000, None  # goes nowhere
        self._hang()
        if event.assoc.dul.state_machine.current_state != "Sta6":
            return 0x0000, None  # the requestor gave up (aborted): nobody to report to
        if self.abort_after_action or self.kill_after_action:
            t = threading.Thread(target=self._abort_after_answer, args=(event.assoc,), daemon=True)
            self._threads.append(t)
            t.start()
        named = {str(r.ReferencedSOPInstanceUID) for r in action.ReferencedSOPSequence}
        if named & self.refuse_instances:
            return self.refuse_status, None
        if self.mode == "none" or code_to_category(self.action_status) not in _ACCEPTED:
            return self.action_status, None
        event_type, report = self._report(action)
        assoc = event.assoc
        t = threading.Thread(
            target=self._send_report, args=(assoc, event_type, report), daemon=True
        )
        self._threads.append(t)
        t.start()
        return self.action_status, None

    def _abort_after_answer(self, assoc: Any) -> None:
        # A network failure right after the answer: the requestor's association ends under it.
        time.sleep(0.3)  # the N-ACTION-RSP goes out meanwhile
        if assoc.is_established and self.kill_after_action:
            self._kill_now(assoc, self.kill_after_action)
        elif assoc.is_established:
            assoc.abort()
            with self._lock:
                self.aborted_after_action += 1

    def _send_report(self, assoc: Any, event_type: int, report: Dataset) -> None:
        deadline = time.monotonic() + self.delay
        while time.monotonic() < deadline:
            time.sleep(0.05)
        while self.hold_report is not None and not self.hold_report.wait(0.05):
            if self._stopping.is_set():
                return  # stopped while held: nothing is reported
        if self.mode == "same":
            # Wait for the N-ACTION-RSP to be out before the report.
            time.sleep(0.2)
            if assoc.is_established:
                status, _ = assoc.send_n_event_report(report, event_type, SC, SC_INSTANCE)
                self._note(status)
            return
        assert self.report_to is not None
        host, port, aet = self.report_to
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(SC, SYNTAXES)
        peer = ae.associate(
            host, port, ae_title=aet, ext_neg=[build_role(SC, scp_role=True, scu_role=False)]
        )
        if peer.is_established:
            status, _ = peer.send_n_event_report(report, event_type, SC, SC_INSTANCE)
            self._note(status)
            peer.release()
            with self._lock:
                self.report_endings.append("released" if peer.is_released else "aborted")

    def _requested(self, event: Any) -> None:
        if self.hang_associate:
            with self._lock:
                self.hung_associations += 1
            while self.hang_associate and not self._stopping.wait(0.05):
                pass

    def _find(self, event: Any) -> Any:
        uid = str(event.identifier.SOPInstanceUID)
        with self._lock:
            self.finds.append(uid)
        if self._kill(event):
            yield 0x0000, None  # goes nowhere
            return
        self._hang()
        with self._lock:
            held = self.held.get(uid)
        if held is not None:
            match = Dataset()
            match.QueryRetrieveLevel = "IMAGE"
            match.SOPInstanceUID = uid
            yield 0xFF00, match
        if uid in self.find_fails:
            yield self.find_fails[uid], None

    def _note(self, status: Any) -> None:
        with self._lock:
            self.report_statuses.append(int(status.Status) if status and "Status" in status else -1)

    def start(self) -> CommitmentSCP:
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(SC, SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")
        ae.add_supported_context(STUDY_FIND, SYNTAXES)
        self._server = start_server(
            ae,
            ("127.0.0.1", self.port or free_port()),
            ssl_context=self.ssl_context,
            evt_handlers=[
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_N_ACTION, self._action),
                (evt.EVT_C_FIND, self._find),
                (evt.EVT_REQUESTED, self._requested),
                (evt.EVT_PDU_RECV, self._received),
            ],
        )
        self.port = self._server.socket.getsockname()[1]
        return self

    def use_tls(self, context: ssl.SSLContext) -> None:
        """Handshake the next connections with ``context`` (those open stay as they are)."""
        self.ssl_context = context
        self._server.ssl_context = context

    def abort_associations(self) -> None:
        """Abort every association open now (the PACS going away: :meth:`stop` alone ends
        only the listening, an association kept open by its requestor stays up)."""
        for assoc in list(self._server.active_associations):
            assoc.abort()

    def stop(self) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join(10)
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> CommitmentSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def end_connection(sock: socket.socket, how: str) -> None:
    """End a connection as a peer does instead of answering: "reset" (RST) or "close" (FIN)."""
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with unread data or linger 0: RST
    else:
        sock.shutdown(socket.SHUT_RDWR)  # FIN
