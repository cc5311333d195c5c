"""The Conformance Statement's SCP AE specification: ``forwarder receive`` (section 3.2.4).

The SOP classes and transfer syntaxes the receiver's engine accepts
(:func:`forwarder.net.receiver.profile`), its association policies, its acceptance policy and
the statuses it answers (read from its own ``STATUS_*`` constants and their comments). The SCU
AEs are :mod:`forwarder.conformance.scu`.
"""

from __future__ import annotations

import inspect
import re

from forwarder.conformance.engine import _Engine, _status_meaning
from forwarder.conformance.markdown import _bytes, _hex, _name, _seconds, _syntax, _table
from forwarder.net import pdu, receiver, scp_object
from forwarder.net import status as dimse_status
from forwarder.net.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from forwarder.net.scp_policy import NON_STORAGE


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
            rows.append([_hex(code), dimse_status.code_to_category(code), meaning, when])
    return sorted(rows)


def _ae_receive(e: _Engine) -> list[str]:
    ae = e.receive_ae
    s = e.receive_settings
    storage = [c for c in ae.supported_contexts if c.abstract_syntax not in NON_STORAGE]
    verification = [
        c for c in ae.supported_contexts if c.abstract_syntax == pdu.VERIFICATION_SOP_CLASS
    ]
    commitment = [c for c in ae.supported_contexts if c.abstract_syntax == STORAGE_COMMITMENT_PUSH]
    accepted = list(storage[0].transfer_syntax) if storage else []
    return [
        "#### 3.2.4 Storage SCP (`forwarder receive`)",
        "",
        "##### 3.2.4.1 SOP Classes",
        "",
        "This AE provides Standard Conformance to the following "
        f"{len(storage) + len(verification) + len(commitment)} "
        "SOP classes, as SCP only (the storage list is pynetdicom's, as the receiver registers "
        "it). With `--promiscuous` it also accepts every other SOP class proposed for storage, "
        "private and unknown ones included, each in the first transfer syntax the caller "
        "proposes, and writes the objects as received.",
        "",
        *_table(
            ["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
            [
                [_name(c.abstract_syntax), f"`{c.abstract_syntax}`", "No", "Yes"]
                for c in [*verification, *commitment, *storage]
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
        *(
            [
                "Storage Commitment Push Model is accepted in: "
                + ", ".join(_syntax(t) for t in commitment[0].transfer_syntax)
                + ".",
                "",
            ]
            if commitment
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
            "(`forwarder.dicom.check.scan_file`)"
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
        "**The daemon's listener** (`listen:` in the configuration of `forwarder run`) is this "
        "same SCP, with the same SOP classes, transfer syntaxes, checks, allow lists, TLS and "
        "limits (`listen.*` keys in place of the options). It differs in what Success means and "
        "in one more refusal: Success is answered only once the object is fsynced under "
        "`incoming/.listen/<calling AE>/` and queued for forwarding; while the incoming "
        "filesystem has less than `listen.min_free_space` free (default 1 GiB), every object "
        'is answered 0xA700 with the Error Comment "the gateway is low on disk space" and '
        'not kept; an object that cannot be queued is answered 0xA700 "cannot queue the '
        'object". Storage commitment on the listener goes both ways. As Storage Commitment '
        "SCP it answers a modality's N-ACTION-RQ as in 3.2.4.5, except where it looks: an "
        "instance is committed when the queue knows a file of that SOP Instance UID and the "
        "file is where the queue says, whole, that instance of that class (in `incoming` while "
        "it is forwarded, in `done/` once delivered, or in `failed/`); otherwise 0x0112, or "
        "0x0119 for another SOP Class; the report goes on the same association. And it accepts "
        "the Storage Commitment Push Model with the requestor as SCP (SCP/SCU Role Selection "
        "proposing SCP role 1 is answered with SCP role 1, SCU role 0) so that a destination "
        "of `forwarder run` with `storage_commitment` can send its N-EVENT-REPORT-RQ to this "
        "port: the report is checked as in 3.2.1.7 and answered with an N-EVENT-REPORT-RSP, "
        "Success, or 0x0110 when it is not trusted (unknown transaction, instances not asked "
        "about, a data set that cannot be read).",
        "",
        *(_commitment_scp() if commitment else []),
    ]


def _commitment_scp() -> list[str]:
    return [
        "##### 3.2.4.5 SOP Specific Conformance: Storage Commitment Push Model SCP",
        "",
        "An N-ACTION-RQ (Action Type ID 1, on the well-known SOP Instance "
        f"`{STORAGE_COMMITMENT_INSTANCE}`) is answered at once with an N-ACTION-RSP: "
        "Success, or 0x0123 (another Action Type), 0x0112 (another SOP Instance), 0x0115 (no "
        "Transaction UID or an empty or incomplete Referenced SOP Sequence), 0x0110 (a data "
        "set that cannot be read). Then each referenced instance is looked up in the output "
        "folder as `DIR/*/<SOPInstanceUID>.dcm` (the layout of 3.2.4.4; the request has no "
        "Study UID, so every study folder is looked in) and its meta header read: the "
        "instance is committed when the file holds that SOP Instance of that SOP Class; "
        "otherwise it is in the Failed SOP Sequence with Failure Reason 0x0112 (not held), "
        "0x0119 (held under another SOP Class) or 0x0110 (unreadable). The N-EVENT-REPORT-RQ "
        "(Event Type ID 1 all committed, 2 failures; Retrieve AE Title our AE title) goes on "
        "the requester's association right after the N-ACTION-RSP, in the context's "
        "transfer syntax; with `--stgcmt-peer HOST:PORT`, on a new association to HOST:PORT "
        "once the requester's association has ended, called AE title the requester's calling "
        "AE title, proposing SCP/SCU Role Selection with us as SCP. Commitment lasts as long "
        "as the file stays in the output folder: `receive` does not keep objects itself.",
        "",
    ]
