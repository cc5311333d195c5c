"""The DICOM Conformance Statement (PS3.2), rendered from the engine's own tables.

``python -m forwarder.conformance`` prints it as Markdown; with a path it writes it there
(``make conformance-statement`` writes ``docs/conformance-statement.md``, which is committed).
tests/test_conformance_statement.py fails when the committed document differs from what this
module renders now, and checks on the wire that what it states is what the engine does.

Every fact the code holds is read from the code, never restated: UIDs and version names, the
presentation contexts :mod:`forwarder.net.contexts` plans, the user information items
:func:`forwarder.net.pdu.encode_associate_rq` puts on the wire, the PDU bounds, every DIMSE status
code run through the sender's own response check and
:func:`forwarder.net.channel.classify_status`, the
conversions :mod:`forwarder.dicom.transcode` performs, the SOP classes and transfer syntaxes the
receiver's engine accepts (:func:`forwarder.net.receiver.profile`), the TLS settings, and the
defaults ``forwarder run``, ``send``, ``echo`` and ``receive`` actually use (built the way
those commands build them). Only what has no table is prose.

This module sits on top, beside :mod:`forwarder.cli`: it reads every layer (the CLI parsers and
``service.association_settings`` included) and nothing imports it. It is no hot path, so it may
import pydicom and pynetdicom freely.
"""

from __future__ import annotations

import argparse
import inspect
import re
import ssl
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydicom.uid import UID, AllTransferSyntaxes

from forwarder import __version__
from forwarder.config import Config, Destination, RetryPolicy, TLSConfig, parse_config
from forwarder.dicom import part10 as dicomfile
from forwarder.dicom import transcode
from forwarder.durations import parse_duration
from forwarder.errors import ProtocolError
from forwarder.net import channel as pool
from forwarder.net import contexts, pdu, receiver, scp_object, tls
from forwarder.net.association import AssociationSettings

DEFAULT_OUTPUT = Path("docs/conformance-statement.md")

_EXAMPLE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage: only to exercise the planner
_PEER = "PEER@127.0.0.1:104"

#: PS3.8 D.3.3: the user information sub-items an A-ASSOCIATE-RQ may carry.
_USER_ITEMS = {
    0x51: "Maximum Length",
    0x52: "Implementation Class UID",
    0x53: "Asynchronous Operations Window",
    0x54: "SCP/SCU Role Selection",
    0x55: "Implementation Version Name",
    0x56: "SOP Class Extended Negotiation",
    0x57: "SOP Class Common Extended Negotiation",
    0x58: "User Identity",
}

#: What each outcome of :func:`forwarder.net.channel.classify_status` means for a file, daemon and
#: ``send``. A new outcome without a sentence here makes rendering fail (and the test with it).
_TREATMENT = {
    pool.Outcome.STORED: "stored",
    pool.Outcome.WARNING: "stored, warning logged",
    pool.Outcome.RETRY: "retried",
    pool.Outcome.FAILED: "failed",
}
_PROTOCOL_ERROR = "protocol error"
_TREATMENT_LEGEND = [
    [
        "stored",
        "The file counts as delivered to this destination (`done/` once every destination "
        "has it). `send`: stored.",
    ],
    [
        "stored, warning logged",
        "As stored; the status and its Error Comment are logged. `send`: stored (exit 0), "
        "counted 'with warnings'.",
    ],
    [
        "retried",
        "Not stored; the daemon tries the file again later with backoff (`retry` policy). "
        "`send`: not stored (exit 1).",
    ],
    [
        "failed",
        "Not stored and not retried: the daemon moves the file to `failed/` with "
        "`NAME.error.json` (status, Error Comment). `send`: not stored (exit 1).",
    ],
    [
        "protocol error",
        "The response is refused (a C-STORE has no Pending responses, PS3.7): the association "
        "is aborted (A-ABORT) and the file is retried as for 'retried'.",
    ],
]


# -- the engine's settings, built the way its commands build them ------------------------------


@dataclass(frozen=True, slots=True)
class _Engine:
    """The settings each AE really runs with by default."""

    destination: Destination
    daemon: AssociationSettings
    send: AssociationSettings
    send_associations: int
    echo: AssociationSettings
    receive_settings: receiver.ReceiverSettings
    receive_ae: receiver.ScpProfile  # what forwarder.net.receiver accepts and announces
    parsers: dict[str, argparse.ArgumentParser]


def _engine() -> _Engine:
    from forwarder.cli import build_parser
    from forwarder.cli._net import resolve
    from forwarder.cli.receive import settings_from_args as receive_settings_from_args
    from forwarder.daemon.service import association_settings

    config = parse_config(
        "incoming: /in\ndone: /done\nfailed: /failed\nqueue: /q.sqlite\n"
        "destinations: [{name: pacs, ae_title: PEER, host: 127.0.0.1, port: 104}]\n"
    )
    destination = config.destinations[0]
    _, parsers = build_parser()
    send_args = parsers["send"].parse_intermixed_args([_PEER, "file.dcm"])
    send = resolve(send_args, list(send_args.args), needs_files=True)
    echo_args = parsers["echo"].parse_intermixed_args([_PEER])
    echo = resolve(echo_args, list(echo_args.args), needs_files=False)
    rargs = parsers["receive"].parse_intermixed_args(["--port", "0", "--output", "/received"])
    rsettings = receive_settings_from_args(rargs)
    ae = receiver.profile(rsettings)
    return _Engine(
        destination=destination,
        daemon=association_settings(destination, config),
        send=send.settings,
        send_associations=send.associations,
        echo=echo.settings,
        receive_settings=rsettings,
        receive_ae=ae,
        parsers=parsers,
    )


# -- Markdown helpers ------------------------------------------------------------------------------


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*out, ""]


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else "(no registered name)"


def _syntax(uid: str) -> str:
    """``Explicit VR Little Endian (`1.2.840.10008.1.2.1`)``."""
    return f"{_name(uid)} (`{uid}`)"


def _seconds(value: float | None) -> str:
    if value is None:
        return "none"
    if value >= 120:
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if value % size == 0:
                return f"{value / size:g}{unit}"
    return f"{value:g}s"


def _bytes(value: int | None) -> str:
    if value is None:
        return "none"
    if value == 0:
        return "0 (no limit)"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value} bytes ({value // size} {unit})"
    return f"{value} bytes"


def _hex(code: int) -> str:
    return f"0x{code:04X}"


# -- facts read from the engine ------------------------------------------------------------------


def _user_items(max_pdu: int) -> dict[int, bytes]:
    """The user information sub-items of the A-ASSOCIATE-RQ the sender really encodes."""
    rq = pdu.encode_associate_rq(
        "PEER",
        "FORWARDER",
        {
            1: pdu.ProposedContext(
                pdu.VERIFICATION_SOP_CLASS, (dicomfile.IMPLICIT_VR_LITTLE_ENDIAN,)
            )
        },
        max_pdu,
    )
    pos, items = 6 + 68, {}
    while pos < len(rq):
        kind, length = struct.unpack_from(">BxH", rq, pos)
        value = rq[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if kind == 0x50:
            sub = 0
            while sub < len(value):
                skind, slen = struct.unpack_from(">BxH", value, sub)
                items[skind] = value[sub + 4 : sub + 4 + slen]
                sub += 4 + slen
    return items


def _store_response_treatment(status: int) -> str:
    """What the sender does with a C-STORE-RSP carrying ``status``: the response goes through
    the same check the sender applies (:func:`forwarder.net.pdu.check_response`), then
    :func:`forwarder.net.channel.classify_status`."""
    sop = _EXAMPLE_SOP_CLASS.encode()
    values = {
        0x0002: sop,
        0x0100: struct.pack("<H", pdu.C_STORE_RSP),
        0x0120: struct.pack("<H", 1),
        0x0800: struct.pack("<H", pdu.NO_DATA_SET),
        0x0900: struct.pack("<H", status),
    }
    try:
        pdu.check_response(values, pdu.C_STORE_RSP, 1, sop, None)
    except ProtocolError:
        return _PROTOCOL_ERROR
    return _TREATMENT[pool.classify_status(status)]


def _status_meaning(status: int) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    entry = STORAGE_SERVICE_CLASS_STATUS.get(status)
    return entry[1] if entry and entry[1] else ""


def _status_ranges() -> list[tuple[int, int, str, str, str]]:
    """Every status code 0x0000-0xFFFF, merged into runs of equal (category, meaning, treatment)."""
    runs: list[tuple[int, int, str, str, str]] = []
    for code in range(0x10000):
        key = (pool.code_to_category(code), _status_meaning(code), _store_response_treatment(code))
        if runs and runs[-1][2:] == key and runs[-1][1] == code - 1:
            runs[-1] = (runs[-1][0], code, *key)
        else:
            runs.append((code, code, *key))
    return runs


def _decoder_available(uid: str) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def _conversion(uid: str) -> str:
    """What happens to a file stored in ``uid`` when the peer accepts only uncompressed."""
    if uid in transcode._NATIVE_SOURCES:  # converted by forwarder itself, not through pydicom
        if uid in dicomfile.UNCOMPRESSED:
            return "between these two: re-encoded (explicit <-> implicit VR), values unchanged"
        if uid == dicomfile.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            return "inflated (and re-encoded for Implicit VR); values unchanged"
        if uid == dicomfile.EXPLICIT_VR_BIG_ENDIAN:
            return (
                "rewritten element by element, inside sequences too, every binary value swapped "
                f"by its element size ({_swap_sizes()}); refused, with the element named, where "
                "a value's size is not known for certain"
            )
        raise ValueError(f"say how transcode converts {uid}")
    if not _decoder_available(uid):
        return "refused, not retried: no decoder in this installation"
    if transcode.possibly_lossy(uid):
        return (
            "refused, unless `allow_lossy_decompress` / `--allow-lossy-decompress` is on or the "
            "file says Lossy Image Compression `00`; then decompressed"
        )
    return "decompressed (lossless)"


def _swap_sizes() -> str:
    """``2 bytes: AT, OW, SS, US; 4 bytes: ...`` from the big endian converter's own table."""
    by_size: dict[int, list[str]] = {}
    for vr, size in transcode._SWAP_SIZE.items():
        by_size.setdefault(size, []).append(vr.decode("ascii"))
    return "; ".join(
        f"{size} bytes: {', '.join(sorted(vrs))}" for size, vrs in sorted(by_size.items())
    )


def _plan_shapes() -> list[tuple[str, list[str]]]:
    """The presentation contexts planned for a file, per transfer syntax, grouped by shape."""
    shapes: dict[tuple[tuple[str, ...], ...], list[str]] = {}
    for ts in [*dicomfile.UNCOMPRESSED, *(str(u) for u in AllTransferSyntaxes)]:
        plans = contexts.contexts_for(_EXAMPLE_SOP_CLASS, ts)
        shape = tuple(
            tuple("the file's own" if i == 0 and t == ts else t for t in p.transfer_syntaxes)
            for i, p in enumerate(plans)
        )
        if ts not in shapes.setdefault(shape, []):
            shapes[shape].append(ts)
    rows = []
    for shape, syntaxes in sorted(shapes.items(), key=lambda item: len(item[1])):
        offered = [
            f"context {i + 1}: "
            + ", ".join(t if t == "the file's own" else _syntax(t) for t in ctx)
            for i, ctx in enumerate(shape)
        ]
        rows.append(("<br>".join(offered), syntaxes))
    return rows


def _is_duration(field: Any) -> bool:
    return any(getattr(m, "func", None) is parse_duration for m in field.metadata)


def _field_rows(model: type[BaseModel], prefix: str, skip: Sequence[str] = ()) -> list[list[str]]:
    rows = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "(see below)"
        elif _is_duration(field) and isinstance(field.default, int | float):
            default = _seconds(float(field.default))
        elif field.default is None:
            default = "none"
        else:
            default = f"`{field.default}`"
        limits = [
            f"{sym} {getattr(m, attr)}"
            for m in field.metadata
            for attr, sym in (("ge", ">="), ("le", "<="), ("gt", ">"), ("lt", "<"))
            if hasattr(m, attr)
        ]
        text = field.description or ""
        if limits:
            text = f"{text} ({', '.join(limits)})" if text else ", ".join(limits)
        rows.append([f"`{prefix}{name}`", default, text])
    return rows


def _option_rows(parser: argparse.ArgumentParser) -> list[list[str]]:
    rows = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if action.dest in ("help", "version"):
            continue
        default = action.default
        flag = action.nargs == 0  # store_true, count, store_const: no value to show
        shown = "" if default is None or default == [] or flag else f"`{default}`"
        rows.append([", ".join(f"`{o}`" for o in action.option_strings), shown, action.help or ""])
    return rows


# -- the document ------------------------------------------------------------------------------


def render() -> str:
    """The whole Conformance Statement, as Markdown."""
    e = _engine()
    out: list[str] = []
    for section in (
        _cover,
        _overview,
        _introduction,
        _implementation_model,
        _ae_daemon,
        _ae_send,
        _ae_echo,
        _ae_receive,
        _network_interfaces,
        _configuration,
        _media,
        _character_sets,
        _security,
        _annexes,
    ):
        out += section(e)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def _cover(e: _Engine) -> list[str]:
    return [
        "# forwarder: DICOM Conformance Statement",
        "",
        "<!-- Generated by `python -m forwarder.conformance` (`make conformance-statement`) from",
        "     the engine's own tables. Do not edit: tests/test_conformance_statement.py fails",
        "     when this file and the code disagree. -->",
        "",
        *_table(
            ["", ""],
            [
                ["Product", "forwarder, a DICOM forwarding daemon and its command-line tools"],
                ["Version", f"`{__version__}`"],
                ["Structure", "DICOM PS3.2 Annex A (Conformance Statement template)"],
            ],
        ),
    ]


def _overview(e: _Engine) -> list[str]:
    n_storage = sum(
        1
        for c in e.receive_ae.supported_contexts
        if c.abstract_syntax != pdu.VERIFICATION_SOP_CLASS
    )
    return [
        "## 1 Conformance Statement Overview",
        "",
        "forwarder takes DICOM files that appear in a folder, queues them durably, and sends each "
        "one unchanged to one or more remote archives, retrying until they have it or a permanent "
        "refusal says they never will. An operator can also send files by hand, test that a "
        "remote system answers, and run a small receiver that writes what it is sent into a "
        "folder. forwarder does not query, retrieve, print, or create images of its own, and "
        "it does not read or write removable media.",
        "",
        *_table(
            ["SOP Classes", "User of Service (SCU)", "Provider of Service (SCP)"],
            [
                ["**Transfer**", "", ""],
                [
                    "Any Storage SOP Class a file carries, standard or private "
                    "(`forwarder run`, `forwarder send`)",
                    "Yes",
                    "No",
                ],
                [
                    f"The {n_storage} Storage SOP Classes of 3.2.4.1 (`forwarder receive`); "
                    "every SOP class proposed for storage with `--promiscuous`",
                    "No",
                    "Yes",
                ],
                ["**Verification**", "", ""],
                ["Verification SOP Class", "Yes (`forwarder echo`)", "Yes (`forwarder receive`)"],
            ],
        ),
        "No Query/Retrieve, Workflow Management or Print Management services are supported. "
        "No Media Storage Application Profiles are supported.",
        "",
    ]


def _introduction(e: _Engine) -> list[str]:
    return [
        "## 2 Introduction",
        "",
        "### 2.1 Audience",
        "",
        "PACS and network administrators connecting forwarder to archives, modalities and "
        "gateways, and integrators checking interoperability before they do.",
        "",
        "### 2.2 Remarks",
        "",
        "Every table in this document is generated from the code it describes: UIDs, defaults, "
        "the presentation contexts planned, the status codes run through the sender's own "
        "response check and classification, the receiver's SOP classes and transfer syntaxes. "
        "A test regenerates the document and fails when it differs, and checks on the wire "
        "(against pynetdicom and DCMTK) that the identifying values and limits stated here are "
        "the ones sent. The DICOM standard remains the reference for what each value means; "
        "this statement does not replace an interoperability test with the actual peer.",
        "",
        "### 2.3 Terms and Abbreviations",
        "",
        *_table(
            ["Term", "Meaning"],
            [
                ["AE", "Application Entity"],
                ["SCU / SCP", "Service Class User / Provider"],
                ["PDU", "Protocol Data Unit (PS3.8)"],
                ["TLS", "Transport Layer Security"],
                ["daemon", "`forwarder run`, the service that watches a folder and forwards"],
                ["destination", "a peer the daemon forwards to, named in its config file"],
            ],
        ),
        "### 2.4 References",
        "",
        "DICOM PS3.2 (Conformance), PS3.4 (Service Class Specifications), PS3.5 (Data "
        "Structures and Encoding), PS3.7 (Message Exchange), PS3.8 (Network Communication "
        "Support), PS3.10 (Media Storage and File Format), PS3.15 (Security Profiles).",
        "",
    ]


def _implementation_model(e: _Engine) -> list[str]:
    return [
        "## 3 Networking",
        "",
        "### 3.1 Implementation Model",
        "",
        "#### 3.1.1 Application Data Flow",
        "",
        "```",
        "files written to incoming/ ─► watcher ─► ingest (check) ─► queue (SQLite) ─► workers ─┐",
        "                                          └─ router: header → destinations           │",
        "  ┌─────────────────────────────────────────────────────────────────────────────────┘",
        "  └► FORWARDING SCU ══ C-STORE ══► remote Storage SCP(s) ─► file to done/ or failed/",
        "",
        "forwarder send FILE|DIR ─► check ─► MANUAL STORAGE SCU ══ C-STORE ══► remote SCP",
        "forwarder echo          ─────────► VERIFICATION SCU    ══ C-ECHO  ══► remote SCP",
        "remote SCU ══ C-STORE / C-ECHO ══► STORAGE SCP (forwarder receive) ─► DIR/<study>/<sop>",
        "```",
        "",
        "#### 3.1.2 Functional Definition of AEs",
        "",
        "- **Forwarding SCU** (`forwarder run`): for each destination, `associations` worker "
        "threads claim queued files, open an association on first use (contexts planned from "
        "the files queued), send each file's data set byte for byte with C-STORE, and record "
        "the outcome in the queue. Associations are kept open between files and released when "
        "idle.",
        "- **Manual Storage SCU** (`forwarder send`): the same engine, driven by the command line "
        "for the files and folders given; reports each file and exits with a status.",
        "- **Verification SCU** (`forwarder echo`): one association, C-ECHO, release.",
        "- **Storage SCP** (`forwarder receive`): accepts associations, answers C-ECHO, and "
        "writes every C-STORE data set as received (Part 10 file, meta header added) to "
        "`DIR/<StudyInstanceUID>/<SOPInstanceUID>.dcm`, atomically, before answering.",
        "",
        "#### 3.1.3 Sequencing of Real-World Activities",
        "",
        "A file is sent only after it is complete in `incoming/` and has passed the data set "
        "check; it moves to `done/` only after every destination it was routed to answered "
        "Success or Warning. The receiver answers a C-STORE only after the object is on disk "
        "(fsynced). Files are not ordered: files of one study may arrive in any order and on "
        "parallel associations.",
        "",
    ]


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
        "the sender release it and negotiate again, proposing the new pair with the old ones.",
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
                ]
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
        "The Forwarding SCU accepts no associations.",
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
            [["Any Storage SOP Class a file carries", "any", "Yes", "No"]],
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
    ]


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings for action in parser._actions)


def _priority(value: int) -> str:
    names = {v: k for k, v in pdu.PRIORITY.items()}
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


def _receiver_statuses() -> list[list[str]]:
    """The receiver's ``STATUS_*`` constants, with the comment each carries in its source line
    (what it is answered for)."""
    source = inspect.getsource(scp_object)
    rows = []
    for name in sorted(n for n in dir(scp_object) if n.startswith("STATUS_")):
        code = getattr(scp_object, name)
        if isinstance(code, int):
            line = re.search(rf"^{name} = [^#\n]*(?:#\s*(.*))?$", source, re.MULTILINE)
            when = line.group(1) if line and line.group(1) else ""
            when = when or ("the object is stored" if code == 0 else "")
            meaning = _status_meaning(code) or ("Success" if code == 0 else "")
            rows.append([_hex(code), pool.code_to_category(code), meaning, when])
    return sorted(rows)


def _ae_receive(e: _Engine) -> list[str]:
    ae = e.receive_ae
    s = e.receive_settings
    storage = [c for c in ae.supported_contexts if c.abstract_syntax != pdu.VERIFICATION_SOP_CLASS]
    verification = [
        c for c in ae.supported_contexts if c.abstract_syntax == pdu.VERIFICATION_SOP_CLASS
    ]
    accepted = list(storage[0].transfer_syntax) if storage else []
    return [
        "#### 3.2.4 Storage SCP (`forwarder receive`)",
        "",
        "##### 3.2.4.1 SOP Classes",
        "",
        "This AE provides Standard Conformance to the following "
        f"{len(storage) + len(verification)} "
        "SOP classes, as SCP only (the storage list is pynetdicom's, as the receiver registers "
        "it). With `--promiscuous` it also accepts every other SOP class proposed for storage, "
        "private and unknown ones included, each in the first transfer syntax the caller "
        "proposes, and writes the objects as received.",
        "",
        *_table(
            ["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
            [
                [_name(c.abstract_syntax), f"`{c.abstract_syntax}`", "No", "Yes"]
                for c in [*verification, *storage]
            ],
        ),
        "##### 3.2.4.2 Association Policies",
        "",
        f"**General.** Application Context Name `{pdu.APPLICATION_CONTEXT}`. Maximum PDU "
        f"announced: {_bytes(ae.maximum_pdu_size)} (`--max-pdu`).",
        "",
        f"**Number of Associations.** At most {ae.maximum_associations} simultaneous "
        "associations (`--max-associations`); one more gets A-ASSOCIATE-RJ transient, local "
        "limit exceeded.",
        "",
        "**Asynchronous Nature.** Supported: a proposed Asynchronous Operations Window is "
        f"answered with at most {ae.async_ops_window} outstanding operations each way (0, "
        "unlimited, counts as that); requests are served and answered in the order they "
        "arrive. Without a window, one operation is outstanding at a time.",
        "",
        "**Implementation Identifying Information** (forwarder's own, as the sender's):",
        "",
        *_table(
            ["", ""],
            [
                ["Implementation Class UID", f"`{ae.implementation_class_uid}`"],
                ["Implementation Version Name", f"`{ae.implementation_version_name}`"],
            ],
        ),
        "##### 3.2.4.3 Association Acceptance Policy",
        "",
        f"Our AE title is `{s.ae_title}` (`--ae-title`). The called AE title is "
        + (
            "checked"
            if ae.require_called_aet
            else "not checked unless `--require-called-aet` is given"
        )
        + "; calling AE titles and source addresses are accepted from anyone unless "
        "`--allow-calling-aet` / `--allow-host` lists them (see 6.2).",
        "",
        "**Accepted Presentation Contexts.** Every SOP class of 3.2.4.1 in any of these transfer "
        "syntaxes; when a context offers several, the first of this list that the caller "
        "offered is chosen (lossless compressed first, then uncompressed, lossy last, so the "
        "receiver never makes a caller compress lossily an image it holds uncompressed):",
        "",
        *_table(
            ["Preference", "Transfer Syntax", "UID"],
            [[i + 1, _name(t), f"`{t}`"] for i, t in enumerate(accepted)],
        ),
        *(
            [
                "Verification is accepted in: "
                + ", ".join(_syntax(t) for t in verification[0].transfer_syntax)
                + ".",
                "",
            ]
            if verification
            else []
        ),
        "Role: SCP only; no SCP/SCU Role Selection or Extended Negotiation is accepted.",
        "",
        "##### 3.2.4.4 SOP Specific Conformance: Storage SCP",
        "",
        "The data set is written as received, never decoded and re-encoded, with a Part 10 meta "
        "header; the file appears atomically (written, fsynced, renamed) and only then is "
        "Success answered"
        + (
            ", after its whole data set was walked by the same scanner `send` and the daemon use "
            "(`forwarder.dicom.part10.scan_file`)"
            if hasattr(receiver, "scan_file")
            else ""
        )
        + ". Level of support: Level 2 (Full) for what is kept (every element, private ones "
        "included, byte for byte); nothing is coerced. Statuses the receiver answers (its "
        "`STATUS_*` constants; a failure carries an Error Comment):",
        "",
        *_table(["Status", "Category", "Meaning", "Answered when"], _receiver_statuses()),
        "**Timeouts** (the receiver's engine):",
        "",
        *_table(
            ["Waiting for", "Default"],
            [
                ["the first PDU (A-ASSOCIATE-RQ) of a connection", _seconds(ae.acse_timeout)],
                ["the next PDU, or progress inside one", _seconds(ae.network_timeout)],
                ["TLS handshake", _seconds(receiver._HANDSHAKE_TIMEOUT)],
            ],
        ),
        "Objects larger than `--max-object-size` (default "
        f"{_bytes(s.max_object_size)}) and objects that cannot be written (disk full) are "
        "refused with a status; nothing is half-written.",
        "",
    ]


def _network_interfaces(e: _Engine) -> list[str]:
    return [
        "### 3.3 Network Interfaces",
        "",
        "#### 3.3.1 Physical Network Interface",
        "",
        "Whatever TCP/IP interface the operating system provides; IPv4 and IPv6.",
        "",
        "#### 3.3.2 Additional Protocols",
        "",
        "Host names are resolved with the system resolver. DICOM over TLS (PS3.15 B.9/B.11) per "
        "destination or command line; see 6. No other protocol is used for DICOM traffic.",
        "",
    ]


def _configuration(e: _Engine) -> list[str]:
    retry_rows = _field_rows(RetryPolicy, "retry.")
    return [
        "### 3.4 Configuration",
        "",
        "#### 3.4.1 AE Title / Presentation Address Mapping",
        "",
        "Our calling AE title is `ae_title` (default "
        f"`{Config.model_fields['ae_title'].default}`), "
        "or a destination's `calling_ae_title`; for `send`/`echo` `--calling-aet` "
        f"(default `{e.send.calling_ae_title}`). Each destination names the called AE title, "
        "host and port of its peer. `forwarder receive` listens as `--ae-title` on `--bind`:"
        "`--port`.",
        "",
        "#### 3.4.2 Parameters",
        "",
        "Config file keys (`forwarder run`; `forwarder send --destination NAME` uses a "
        "destination's too), with the defaults the code applies:",
        "",
        *_table(
            ["Key", "Default", "Meaning"],
            [
                *_field_rows(
                    Config, "", skip=("destinations", "routes", "watch", "metrics", "retry")
                ),
                *_field_rows(Destination, "destinations[].", skip=("tls",)),
                *_field_rows(TLSConfig, "destinations[].tls."),
                *retry_rows,
            ],
        ),
        "`forwarder send` and `forwarder echo` options (seed spellings such as `-connectTO` "
        "are accepted too, see `--help`):",
        "",
        *_table(["Option", "Default", "Meaning"], _option_rows(e.parsers["send"])),
        "`forwarder receive` options:",
        "",
        *_table(["Option", "Default", "Meaning"], _option_rows(e.parsers["receive"])),
    ]


def _media(e: _Engine) -> list[str]:
    return [
        "## 4 Media Interchange",
        "",
        "Not supported. (forwarder reads and writes DICOM Part 10 files in folders, but not as a "
        "File-set with a DICOMDIR on interchange media.)",
        "",
    ]


def _character_sets(e: _Engine) -> list[str]:
    return [
        "## 5 Support of Character Sets",
        "",
        "forwarder does not interpret, convert or replace character data. Data sets are sent "
        "byte for byte as they are in the file, Specific Character Set (0008,0005) included, "
        "so any character set the file declares reaches the peer unchanged; a conversion "
        "between transfer syntaxes (3.2.1.4) re-encodes values but keeps their bytes and the "
        "declared character set. The receiver stores what it receives as received. Routing "
        "matches header values as the file holds them. AE titles are ASCII (printable, 1-16 "
        "characters, no backslash).",
        "",
    ]


def _security(e: _Engine) -> list[str]:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls._harden(client)
    options = []
    if client.options & ssl.OP_NO_COMPRESSION:
        options.append("no TLS compression")
    if client.options & ssl.OP_NO_RENEGOTIATION:
        options.append("no renegotiation")
    version = client.minimum_version.name.replace("v", " ").replace("_", ".")
    s = e.receive_settings
    return [
        "## 6 Security",
        "",
        "### 6.1 Security Profiles",
        "",
        "DICOM TLS following the BCP 195 profile (PS3.15 B.9/B.11), as DCMTK's default:",
        "",
        *_table(
            ["", ""],
            [
                ["Minimum protocol version", version + " (TLS 1.3 whenever the peer has it)"],
                ["TLS 1.2 cipher suites (OpenSSL string)", f"`{tls._TLS12_CIPHERS}`"],
                ["TLS 1.3 cipher suites", "OpenSSL's (all AEAD)"],
                ["Other", ", ".join(options)],
                [
                    "SCU (`run`, `send`, `echo`)",
                    "the peer's certificate is always verified (`tls.ca`, else the system "
                    "store) and, unless `verify_hostname: false`, its name against the host; "
                    "`tls.cert`/`tls.key` add our certificate (mutual TLS); a destination with "
                    "TLS never falls back to plain TCP",
                ],
                [
                    "SCP (`receive`)",
                    "`--tls-cert`/`--tls-key`; `--tls-ca` requires and verifies client "
                    "certificates (mutual TLS)",
                ],
                ["Private keys", "refused when group or others may read them"],
            ],
        ),
        "### 6.2 Association Level Security",
        "",
        *_table(
            ["Check (forwarder receive)", "Default", "Rejection"],
            [
                [
                    "`--allow-calling-aet AET` (repeatable)",
                    "any"
                    if not s.allowed_calling_aets
                    else ", ".join(sorted(s.allowed_calling_aets)),
                    "A-ASSOCIATE-RJ permanent, calling AE title not recognised",
                ],
                [
                    "`--require-called-aet`",
                    "on" if s.require_called_aet else "off",
                    "A-ASSOCIATE-RJ permanent, called AE title not recognised",
                ],
                [
                    "`--allow-host ADDR_OR_CIDR` (repeatable)",
                    "any" if not s.allowed_networks else ", ".join(map(str, s.allowed_networks)),
                    "connection closed before any PDU",
                ],
            ],
        ),
        "The SCUs send their calling AE title and the destination's called AE title; they do "
        "not send User Identity.",
        "",
        "### 6.3 Application Level Security",
        "",
        "None beyond the above. Logs name UIDs, paths, AE titles and statuses, never patient "
        "names or IDs (unless the config's `log_phi` debug switch is on).",
        "",
    ]


def _annexes(e: _Engine) -> list[str]:
    return [
        "## 7 Annexes",
        "",
        "### 7.1 IOD Contents",
        "",
        "**Created SOP Instances.** None: forwarder only transfers instances others created.",
        "",
        "**Usage of attributes from received IODs.** The sender reads the File Meta "
        "Information (Media Storage SOP Class/Instance UID, Transfer Syntax UID) and checks "
        "that the data set is complete and holds its own SOP Class and SOP Instance UID. The "
        "daemon's router reads the attributes its routes match on. The receiver reads the "
        "Study Instance UID and SOP Instance UID to name the file.",
        "",
        "**Coerced/modified fields.** None. A converted file (3.2.1.4) keeps every attribute and "
        "its SOP Instance UID; only the encoding changes.",
        "",
        "### 7.2 Data Dictionary of Private Attributes",
        "",
        "None defined. Private attributes are passed through unchanged.",
        "",
        "### 7.3 Private Transfer Syntaxes and SOP Classes",
        "",
        "None defined. A file in a private transfer syntax or SOP class is proposed as it is "
        "(3.2.1.3); the receiver accepts private SOP classes with `--promiscuous`.",
        "",
    ]


# -- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m forwarder.conformance",
        description="Render forwarder's DICOM Conformance Statement (Markdown).",
    )
    parser.add_argument(
        "output", nargs="?", type=Path, help=f"write it here (e.g. {DEFAULT_OUTPUT}); else print"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
