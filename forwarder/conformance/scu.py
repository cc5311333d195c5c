"""The Conformance Statement's SCU AE specifications: ``forwarder run``, ``send`` and ``echo``.

Sections 3.2.1 to 3.2.3: association policies (the user information items, PDU sizes, timeouts),
the association initiation policy (the presentation contexts proposed), the conversions, and the
treatment of every C-STORE response status, each table read from the engine
(:mod:`forwarder.conformance.engine`). The SCP (``receive``) is :mod:`forwarder.conformance.scp`.
"""

from __future__ import annotations

import argparse
import struct

from pydicom.uid import AllTransferSyntaxes

from forwarder.config import Destination, RetryPolicy
from forwarder.conformance.engine import (
    _TREATMENT_LEGEND,
    _USER_ITEMS,
    _conversion,
    _Engine,
    _plan_shapes,
    _status_ranges,
    _user_items,
)
from forwarder.conformance.markdown import _bytes, _hex, _name, _seconds, _syntax, _table
from forwarder.dicom import part10 as dicomfile
from forwarder.dicom import transcode
from forwarder.errors import ProtocolError
from forwarder.net import pdu
from forwarder.net.association import AssociationSettings
from forwarder.net.command_set import PRIORITY
from forwarder.net.commitment import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
)
from forwarder.net.query_scu import STUDY_ROOT_FIND


def _assoc_policy_rows(settings: AssociationSettings) -> list[list[str]]:
    items = _user_items(settings.max_pdu_receive)
    rows = []
    for kind, label in _USER_ITEMS.items():
        raw = items.get(kind)
        if raw is None:
            value = "not sent"
        elif kind == 0x51:
            value = _bytes(struct.unpack(">I", raw)[0])
        else:
            value = f"`{raw.decode('ascii')}`"
        rows.append([f"{label} (0x{kind:02X})", value])
    return rows


def _scu_policies(e: _Engine, number: str, settings: AssociationSettings, count: str) -> list[str]:
    return [
        f"##### {number} Association Policies",
        "",
        "**General.** Application Context Name "
        f"`{pdu.APPLICATION_CONTEXT}`. The A-ASSOCIATE-RQ carries these user information "
        "items (decoded from the PDU the sender encodes):",
        "",
        *_table(["User information sub-item", "Value"], _assoc_policy_rows(settings)),
        f"**Number of Associations.** {count}",
        "",
        "**Asynchronous Nature.** Not supported: no Asynchronous Operations Window is proposed, "
        "so one C-STORE is outstanding per association at a time (parallelism comes from "
        "several associations).",
        "",
        "**Implementation Identifying Information.**",
        "",
        *_table(
            ["", ""],
            [
                ["Implementation Class UID", f"`{pdu.IMPLEMENTATION_CLASS_UID}`"],
                ["Implementation Version Name", f"`{pdu.IMPLEMENTATION_VERSION}`"],
            ],
        ),
    ]


def _pdu_rows(settings: AssociationSettings) -> list[list[str]]:
    rows = []
    for peer_max in (0, 0xFFFFFFFF, pdu.MAX_SEND_PDU * 4, 16384, pdu.MIN_SEND_PDU, 7):
        try:
            result = _bytes(pdu.send_pdu_limit(peer_max, settings.max_pdu_send))
        except ProtocolError:
            result = "association aborted (no data could ever be sent), retried later"
        rows.append([_bytes(peer_max) if peer_max else "0 (no limit)", result])
    return rows


def _timeouts(settings: AssociationSettings) -> list[list[str]]:
    accept = (
        _seconds(settings.accept_timeout)
        if settings.accept_timeout is not None
        else f"the connect timeout ({_seconds(settings.connect_timeout)})"
    )
    return [
        ["TCP connect (and TLS handshake)", _seconds(settings.connect_timeout)],
        ["A-ASSOCIATE-AC/RJ after the request", accept],
        ["each DIMSE response; progress while sending", _seconds(settings.response_timeout)],
        ["A-RELEASE-RP", _seconds(settings.release_timeout)],
    ]


def _initiation(e: _Engine, number: str, settings: AssociationSettings, who: str) -> list[str]:
    shapes = _plan_shapes()
    return [
        f"##### {number} Association Initiation Policy",
        "",
        f"**Activity: store a file.** {who} Presentation contexts are planned from the files "
        "to send (the daemon also looks at what else is queued for the destination), one "
        "(SOP class, transfer syntax) pair at a time, at most "
        f"{pdu.MAX_CONTEXTS} contexts per association; pairs that do not fit open further "
        "associations. A file needing a context the open association did not propose makes "
        "the sender release it and negotiate again, proposing the new pair with the old ones. "
        "The daemon sets each C-STORE request's Priority from the file's route: urgent HIGH "
        f"(`{_hex(PRIORITY['high'])}`), normal MEDIUM (`{_hex(PRIORITY['medium'])}`), "
        f"low LOW (`{_hex(PRIORITY['low'])}`); a destination that failed at the connection "
        "level is probed with C-ECHO (Verification, Implicit VR Little Endian) before files are "
        "sent to it again.",
        "",
        "**Proposed Presentation Contexts.** The abstract syntax is the file's SOP Class UID, "
        "the data set's own (any storage SOP class, standard or private; a file whose data set "
        "lacks its own SOP Class or Instance UID is refused with that reason). The transfer "
        "syntaxes proposed depend on the file's own transfer syntax "
        "(from `forwarder.net.contexts`):",
        "",
        *_table(
            ["File's transfer syntax", "Contexts proposed for its SOP class", "Role", "Ext. neg."],
            [
                [
                    ", ".join(_syntax(t) for t in syntaxes)
                    if len(syntaxes) < 3
                    else f"Every other: the {len(syntaxes)} others pydicom knows (e.g. "
                    + ", ".join(_name(t) for t in syntaxes[:3])
                    + "), private ones too",
                    offered,
                    "SCU",
                    "None",
                ]
                for offered, syntaxes in shapes
            ],
        ),
        "Each context carries one syntax (or the uncompressed pair), so a peer accepts or "
        "rejects the compressed form and the uncompressed fallback separately and cannot "
        "force a conversion of a file it would take as it is. No SCP/SCU Role Selection, "
        "SOP Class Extended or Common Extended Negotiation is proposed.",
        "",
        "**Transfer syntax selection.** A file goes in its own transfer syntax whenever the peer "
        "accepted a context with it: its data set is streamed from the file byte for byte "
        "(an odd-length data set gets one trailing zero byte, as PS3.5 requires even lengths). "
        "Otherwise the first accepted uncompressed context of its SOP class is used and the "
        "file is converted (3.2.1.4); if there is none, the file is not stored: 'no acceptable "
        "presentation context' (failed, not retried).",
        "",
        "**Maximum PDU size.** We announce "
        f"{_bytes(settings.max_pdu_receive)} as our Maximum Length. P-DATA-TF PDUs we send "
        "never exceed the peer's announced maximum, clamped to sane bounds "
        f"(`forwarder.net.pdu.send_pdu_limit`: at most {_bytes(pdu.MAX_SEND_PDU)}, "
        f"at least {pdu.MIN_SEND_PDU} bytes, always even):",
        "",
        *_table(["Peer's Maximum Length", "Largest PDU we send"], _pdu_rows(settings)),
        "**Timeouts.**",
        "",
        *_table(["Waiting for", "Default"], _timeouts(settings)),
    ]


def _conversions() -> list[str]:
    targets = ", ".join(_syntax(t) for t in dicomfile.UNCOMPRESSED)
    rows = [
        [
            _syntax(str(uid)),
            "yes" if transcode.possibly_lossy(str(uid)) else "",
            _conversion(str(uid)),
        ]
        for uid in AllTransferSyntaxes
    ]
    return [
        "##### 3.2.1.4 Conversions",
        "",
        "A file whose own transfer syntax the peer did not accept is converted, in memory, to "
        f"the uncompressed syntax the peer accepted ({targets}); the file on disk is never "
        "changed. The SOP Instance UID and every other attribute are kept (only the encoding "
        "changes). A file that cannot be converted is refused with its reason and not retried:",
        "",
        *_table(
            ["Source transfer syntax", "Possibly lossy", "When the peer accepts only uncompressed"],
            rows,
        ),
    ]


def _status_section(number: str) -> list[str]:
    rows = []
    for first, last, category, meaning, treatment in _status_ranges():
        codes = _hex(first) if first == last else f"{_hex(first)}-{_hex(last)}"
        rows.append([category, meaning or "—", codes, treatment])
    rp = RetryPolicy()
    return [
        f"##### {number} SOP Specific Conformance: Storage SCU",
        "",
        "Every C-STORE-RSP is checked against the request before its status is read "
        "(Command Field, Message ID Being Responded To, Command Data Set Type, a two-byte "
        "Status, Affected SOP Class/Instance UID when present); a response that fails the check "
        "is a protocol error. The table covers every status code, 0x0000 to 0xFFFF "
        "(categories per PS3.7 Annex C; meanings per PS3.4 B.2.3):",
        "",
        *_table(["Service Status", "Further Meaning", "Error Code", "Behavior"], rows),
        *_table(["Behavior", "What happens to the file"], _TREATMENT_LEGEND),
        "Retries back off exponentially with jitter from "
        f"{_seconds(rp.initial_delay)} to {_seconds(rp.max_delay)} (config `retry`); a file is "
        f"given up after {rp.max_attempts if rp.max_attempts else 'unlimited'} attempts or "
        f"{_seconds(rp.give_up_after)}, then moved to `failed/`. An attempt is counted only for "
        "a file actually tried.",
        "",
        "**Communication failure behavior.**",
        "",
        *_table(
            ["Exception", "Behavior"],
            [
                [
                    "Connection refused, unreachable, TCP or TLS failure, connect timeout",
                    "No association; the files of the batch go back to the queue without an "
                    "attempt counted except the one tried; retried with backoff. `send`: exit 3 "
                    "when nothing could be stored.",
                ],
                [
                    "A-ASSOCIATE-RJ, transient",
                    "Retried with backoff.",
                ],
                [
                    "A-ASSOCIATE-RJ, permanent (e.g. our AE title unknown to the peer)",
                    "Not the files' fault: the destination is held, its files stay queued "
                    "without an attempt counted, and status, metrics and log say why. "
                    "`send`: exit 3.",
                ],
                [
                    "Response timeout, or the peer stops reading while we send",
                    "The association is aborted (A-ABORT); the file is retried.",
                ],
                [
                    "A-ABORT from the peer, or the connection closed",
                    "The file in flight is retried on a new association.",
                ],
                [
                    "A-RELEASE-RQ from the peer",
                    "Answered with A-RELEASE-RP (also during our own release); a file in flight "
                    "is retried.",
                ],
                [
                    "Malformed or unexpected PDU, item or response (PS3.7/PS3.8 violation)",
                    "The association is aborted; the file is retried (a protocol error is never "
                    "the file's fault).",
                ],
            ],
        ),
    ]


def _ae_daemon(e: _Engine) -> list[str]:
    d = e.destination
    assoc = Destination.model_fields["associations"]
    limits = {
        attr: getattr(m, attr) for m in assoc.metadata for attr in ("ge", "le") if hasattr(m, attr)
    }
    count = (
        f"Per destination, `associations` parallel associations (default {d.associations}, "
        f"{limits.get('ge', 1)} to {limits.get('le', '?')}); destinations are independent, so the "
        "total is the sum over destinations. An association idle for `idle_timeout` "
        f"(default {_seconds(d.idle_timeout)}) is released; an idle one is checked before reuse "
        "and replaced when the peer has closed it."
    )
    return [
        "### 3.2 AE Specifications",
        "",
        "#### 3.2.1 Forwarding SCU (`forwarder run`)",
        "",
        "##### 3.2.1.1 SOP Classes",
        "",
        "This AE provides Standard Conformance to the following SOP classes:",
        "",
        *_table(
            ["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
            [
                [
                    "Every Storage SOP Class a queued file carries (standard or private)",
                    "any",
                    "Yes",
                    "No",
                ],
                [
                    _name(STORAGE_COMMITMENT_PUSH) + " (with `storage_commitment`)",
                    f"`{STORAGE_COMMITMENT_PUSH}`",
                    "Yes",
                    "No",
                ],
                [
                    _name(STUDY_ROOT_FIND) + " (with `verify_by_query`)",
                    f"`{STUDY_ROOT_FIND}`",
                    "Yes",
                    "No",
                ],
            ],
        ),
        *_scu_policies(e, "3.2.1.2", e.daemon, count),
        *_initiation(
            e,
            "3.2.1.3",
            e.daemon,
            "The daemon opens an association to a destination when files are queued for it.",
        ),
        *_conversions(),
        *_status_section("3.2.1.5"),
        "##### 3.2.1.6 Association Acceptance Policy",
        "",
        "The Forwarding SCU accepts no storage associations. With `storage_commitment.port` "
        "set, a small acceptor on that port accepts associations proposing the Storage "
        "Commitment Push Model (either role; Verification too) for N-EVENT-REPORTs only. "
        "With `listen:` the daemon's listener (3.2.4) also takes N-EVENT-REPORTs, on "
        "associations proposing the Storage Commitment Push Model with the requestor as SCP.",
        "",
        "##### 3.2.1.7 SOP Specific Conformance: Proof of Delivery",
        "",
        "**Storage Commitment Push Model SCU** (`storage_commitment`): stored instances are "
        "grouped per study (once nothing was stored for it for `settle`, or every "
        "`max_instances`); for each group the transaction is recorded in the queue, then one "
        "N-ACTION-RQ (Action Type ID 1, as 3.2.2.3) goes on an association of its own. The "
        "N-EVENT-REPORT is accepted on that association (kept open `wait_on_association`), on "
        "the acceptor of 3.2.1.6, on the daemon's `listen` port (3.2.4), or, after a restart, "
        "for any transaction still open; it is "
        "trusted as in 3.2.2.3. Instances in the Failed SOP Sequence or not reported by "
        "`timeout` are sent again (C-STORE) and asked about again, up to `max_resends`, then "
        'reported failed ("stored but not committed" with the Failure Reason). An '
        "N-ACTION-RSP with a Warning status is taken as Success; with a failure status nothing "
        "is requested, and the instances are asked again later; after 5 such refusals, each "
        "after another N-ACTION-RSP to this destination was Success or Warning, they are not "
        "committed (sent again, as above). A refusal with 0x0213 (Resource Limitation) or "
        "0xA7xx (Out of Resources) is transient: asked again later, never counted.",
        "",
        "**Study Root Query/Retrieve Information Model - FIND SCU** (`verify_by_query`): "
        "`after` the store, one C-FIND-RQ per instance at IMAGE level with Query/Retrieve "
        "Level, Study, Series and SOP Instance UID (unique keys only), "
        + ", ".join(_syntax(t) for t in COMMITMENT_SYNTAXES)
        + ". A Pending response naming the instance means held; Success without one means "
        "not held (the instance is sent again, as for storage commitment); any other status "
        "decides nothing (asked again later).",
        "",
    ]


def _ae_send(e: _Engine) -> list[str]:
    s = e.send
    count = (
        f"`--associations N` (default {e.send_associations}) parallel associations; "
        "extra associations the peer refuses while one works are dropped without failing files."
    )
    return [
        "#### 3.2.2 Manual Storage SCU (`forwarder send`)",
        "",
        "The same engine as 3.2.1 (same contexts, conversions, status handling), with these "
        "defaults. Every file is checked end to end before any association is opened; a file "
        "that fails the check is refused with its reason"
        + (
            " (`--no-check` sends files as they are, for experts)."
            if _has_option(e.parsers["send"], "--no-check")
            else "."
        ),
        "",
        *_table(
            ["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
            [
                ["Any Storage SOP Class a file carries", "any", "Yes", "No"],
                *(
                    [[_name(STORAGE_COMMITMENT_PUSH), f"`{STORAGE_COMMITMENT_PUSH}`", "Yes", "No"]]
                    if _has_option(e.parsers["send"], "--stgcmt")
                    else []
                ),
            ],
        ),
        *_scu_policies(e, "3.2.2.1", s, count),
        "##### 3.2.2.2 Association Initiation Policy",
        "",
        f"Calling AE title `{s.calling_ae_title}` unless given; DIMSE priority "
        f"{_priority(s.priority)}; maximum PDU announced {_bytes(s.max_pdu_receive)}. "
        "Each association ends with A-RELEASE (`--abort`: A-ABORT).",
        "",
        *_table(["Waiting for", "Default"], _timeouts(s)),
        "Exit status: 0 every file stored (Success or Warning), 1 at least one not stored, "
        "2 bad command line, 3 the peer could not be reached or refused the association and "
        "nothing was stored, 78 invalid config file.",
        "",
        *(_stgcmt_scu() if _has_option(e.parsers["send"], "--stgcmt") else []),
    ]


def _stgcmt_scu() -> list[str]:
    from forwarder.cli._stgcmt import DEFAULT_TIMEOUT

    return [
        "##### 3.2.2.3 SOP Specific Conformance: Storage Commitment Push Model SCU",
        "",
        "With `--stgcmt`, after the C-STOREs, one further association (pynetdicom) proposes "
        "the Storage Commitment Push Model in "
        + ", ".join(_syntax(t) for t in COMMITMENT_SYNTAXES)
        + " (role SCU, no role selection) and sends one N-ACTION-RQ (Action Type ID 1) on "
        f"the well-known SOP Instance `{STORAGE_COMMITMENT_INSTANCE}`, with a new Transaction "
        "UID and a Referenced SOP Sequence naming each instance the peer answered Success or "
        "Warning for. The N-EVENT-REPORT (Event Type 1 or 2) is accepted on that association, "
        "which stays open until the report, the peer's release or `--stgcmt-timeout` "
        f"(default {_seconds(DEFAULT_TIMEOUT)}); with `--stgcmt-port PORT` the association is "
        "released after the N-ACTION-RSP and the report is accepted on an association the "
        "peer opens to the calling AE title on PORT (SCU or SCP role proposed by the peer "
        "accepted; Verification accepted too). An N-ACTION-RSP with a Warning status (0x0001, "
        "0x0107, 0x0116, 0xBxxx) is taken as Success (and logged); with a failure status, "
        "nothing is requested and every instance is not committed. "
        "A report is trusted only when its Transaction "
        "UID is ours and every instance it names was asked for, with the same SOP Class, once; "
        "otherwise it is logged, answered 0x0110 or 0x0115, and ignored. An instance in the "
        "Failed SOP Sequence (with its Failure Reason), or not reported in time, is not "
        "committed: it is named in `--report` and the exit status is 1.",
        "",
    ]


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings for action in parser._actions)


def _priority(value: int) -> str:
    names = {v: k for k, v in PRIORITY.items()}
    return f"{names.get(value, '?').upper()} (`{_hex(value)}`)"


def _ae_echo(e: _Engine) -> list[str]:
    from forwarder.cli.echo import _VERIFICATION

    s = e.echo
    return [
        "#### 3.2.3 Verification SCU (`forwarder echo`)",
        "",
        *_table(
            ["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
            [[_name(pdu.VERIFICATION_SOP_CLASS), f"`{pdu.VERIFICATION_SOP_CLASS}`", "Yes", "No"]],
        ),
        "One association, the same identifying information and user information items as "
        "3.2.1.2, C-ECHO (`--repeat N` times), A-RELEASE. Proposed presentation context:",
        "",
        *_table(
            ["Abstract Syntax", "Transfer Syntaxes", "Role", "Ext. neg."],
            [
                [
                    _syntax(_VERIFICATION.abstract_syntax),
                    ", ".join(_syntax(t) for t in _VERIFICATION.transfer_syntaxes),
                    "SCU",
                    "None",
                ]
            ],
        ),
        *_table(["Waiting for", "Default"], _timeouts(s)),
        "Exit status 0 when the peer answers Success, 3 when it cannot be reached or refuses "
        "the association, 1 for any other status.",
        "",
    ]
