"""The facts the Conformance Statement states, read from the engine itself, never restated.

:func:`_engine` builds the settings each AE really runs with by default, the way ``forwarder
run``, ``send``, ``echo`` and ``receive`` build them (the CLI parsers and
``service.association_settings`` included). The helpers below read the rest from the code: the
user information items :func:`forwarder.net.pdu.encode_associate_rq` puts on the wire, every
DIMSE status code run through the sender's own response check and
:func:`forwarder.net.status.classify_status`, the conversions :mod:`forwarder.dicom.transcode`
and :mod:`forwarder.dicom.reencode` perform, the presentation contexts
:mod:`forwarder.net.contexts` plans, the configuration fields and command-line options; and the
treatment each status outcome gets, with what that treatment means. The sections that lay these
out in Markdown are the package's other modules.
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydicom.uid import AllTransferSyntaxes

from forwarder.config import Destination, parse_config
from forwarder.conformance.markdown import _seconds, _syntax
from forwarder.dicom import part10 as dicomfile
from forwarder.dicom import reencode, transcode
from forwarder.durations import parse_duration
from forwarder.errors import ProtocolError
from forwarder.net import command_set, contexts, pdu, receiver
from forwarder.net import status as dimse_status
from forwarder.net.association import AssociationSettings

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

#: What each outcome of :func:`forwarder.net.status.classify_status` means for a file, daemon and
#: ``send``. A new outcome without a sentence here makes rendering fail (and the test with it).
_TREATMENT = {
    dimse_status.Outcome.STORED: "stored",
    dimse_status.Outcome.WARNING: "stored, warning logged",
    dimse_status.Outcome.RETRY: "retried",
    dimse_status.Outcome.FAILED: "failed",
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
    the same check the sender applies (:func:`forwarder.net.command_set.check_response`), then
    :func:`forwarder.net.status.classify_status`."""
    sop = _EXAMPLE_SOP_CLASS.encode()
    values = {
        0x0002: sop,
        0x0100: struct.pack("<H", command_set.C_STORE_RSP),
        0x0120: struct.pack("<H", 1),
        0x0800: struct.pack("<H", command_set.NO_DATA_SET),
        0x0900: struct.pack("<H", status),
    }
    try:
        command_set.check_response(values, command_set.C_STORE_RSP, 1, sop, None)
    except ProtocolError:
        return _PROTOCOL_ERROR
    return _TREATMENT[dimse_status.classify_status(status)]


def _status_meaning(status: int) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    entry = STORAGE_SERVICE_CLASS_STATUS.get(status)
    return entry[1] if entry and entry[1] else ""


def _status_ranges() -> list[tuple[int, int, str, str, str]]:
    """Every status code 0x0000-0xFFFF, merged into runs of equal (category, meaning, treatment)."""
    runs: list[tuple[int, int, str, str, str]] = []
    for code in range(0x10000):
        key = (
            dimse_status.code_to_category(code),
            _status_meaning(code),
            _store_response_treatment(code),
        )
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
    for vr, size in reencode._SWAP_SIZE.items():
        by_size.setdefault(size, []).append(vr.decode("ascii"))
    return "; ".join(
        f"{size} bytes: {', '.join(sorted(vrs))}" for size, vrs in sorted(by_size.items())
    )


def _plan_shapes() -> list[tuple[str, list[str]]]:
    """The presentation contexts planned for a file, per transfer syntax, grouped by shape."""
    shapes: dict[tuple[tuple[str, ...], ...], list[str]] = {}
    for ts in [*dicomfile.UNCOMPRESSED, *(str(u) for u in AllTransferSyntaxes)]:
        plans = contexts.proposals_for(_EXAMPLE_SOP_CLASS, ts)
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
