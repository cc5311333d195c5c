"""What a STOW-RS response says of each instance (PS3.18 10.5.3, Table 10.5.3-1).

The response data set lists the stored instances in Referenced SOP Sequence (0008,1199), each
with Referenced SOP Instance UID (0008,1155) and possibly Warning Reason (0008,1196), and the
others in Failed SOP Sequence (0008,1198) with Failure Reason (0008,1197). It comes as
``application/dicom+json`` (the usual) or ``application/dicom+xml`` (the Native DICOM Model of
PS3.19); both are read here. An empty or unreadable body raises :class:`ResponseError`.

Mapping reasons to outcomes is the channel's business, not this module's.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from forwarder.errors import ForwarderError

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
REFERENCED_SOP_CLASS_UID = "00081150"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


#: A node of the response: a JSON object or an XML element.
Node = TypeVar("Node")


class ResponseError(ForwarderError):
    """The response body is not a STOW-RS response data set we can read."""


@dataclass(frozen=True, slots=True)
class StowResponse:
    """Per SOP Instance UID: stored (with its Warning Reason or None) or failed (with its
    Failure Reason or None). ``warning`` is a Warning Reason given for the whole response.
    ``classes``: the Referenced SOP Class UID of each stored instance that has one (the
    channel takes an item naming our instance under another class as no proof of ours)."""

    stored: dict[str, int | None] = field(default_factory=dict)
    failed: dict[str, int | None] = field(default_factory=dict)
    warning: int | None = None
    classes: dict[str, str] = field(default_factory=dict)


def parse_response(body: bytes, content_type: str) -> StowResponse:
    """Read ``body``; :class:`ResponseError` when it is empty or not JSON/XML we understand."""
    if not body.strip():
        raise ResponseError("the response has no body (no Referenced or Failed SOP Sequence)")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind.endswith("xml") or (not kind.endswith("json") and body.lstrip().startswith(b"<")):
        return _from_xml(body)
    return _from_json(body)


def _read(
    root: Node,
    items: Callable[[Node, str], list[Node]],
    text: Callable[[Node, str], str | None],
    number: Callable[[Node, str], int | None],
) -> StowResponse:
    """The response from its data set, read with one encoding's accessors."""

    def by_uid(sequence: str, value: Callable[[Node], Any]) -> dict[str, Any]:
        return {
            uid: value(item)
            for item in items(root, sequence)
            if (uid := text(item, REFERENCED_SOP_INSTANCE_UID))
        }

    stored = by_uid(REFERENCED_SOP_SEQUENCE, lambda item: number(item, WARNING_REASON))
    failed = by_uid(FAILED_SOP_SEQUENCE, lambda item: number(item, FAILURE_REASON))
    named = by_uid(REFERENCED_SOP_SEQUENCE, lambda item: text(item, REFERENCED_SOP_CLASS_UID))
    classes = {uid: sop_class for uid, sop_class in named.items() if sop_class}
    return StowResponse(stored, failed, number(root, WARNING_REASON), classes)


# -- JSON (PS3.18 F.2) ------------------------------------------------------------------------


def _from_json(body: bytes) -> StowResponse:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResponseError(f"the response is not valid JSON ({exc})") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # some servers wrap the data set in an array
    if not isinstance(data, dict):
        raise ResponseError("the JSON response is not a DICOM data set (an object)")
    return _read(data, _json_items, _json_str, _json_int)


def _json_value(data: dict[str, Any], tag: str) -> list[Any]:
    element = data.get(tag) or data.get(tag.lower())
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return value if isinstance(value, list) else []


def _json_items(data: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return [item for item in _json_value(data, tag) if isinstance(item, dict)]


def _json_str(data: dict[str, Any], tag: str) -> str | None:
    value = _json_value(data, tag)
    return str(value[0]).strip() if value and value[0] is not None else None


def _json_int(data: dict[str, Any], tag: str) -> int | None:
    value = _json_value(data, tag)
    return _as_int(value[0]) if value else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value & 0xFFFF
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text, 16) & 0xFFFF if text.lower().startswith("0x") else int(text) & 0xFFFF
        except ValueError:
            return None
    return None


# -- XML (PS3.19 A.1, the Native DICOM Model) -------------------------------------------------


def _from_xml(body: bytes) -> StowResponse:
    try:
        root = ET.fromstring(body)  # expat refuses entity expansion bombs
    except ET.ParseError as exc:
        raise ResponseError(f"the response is not valid XML ({exc})") from None
    return _read(root, _xml_items, _xml_str, _xml_int)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_attribute(parent: ET.Element, tag: str) -> ET.Element | None:
    for child in parent:
        if _local(child.tag) == "DicomAttribute" and child.get("tag", "").upper() == tag:
            return child
    return None


def _xml_items(parent: ET.Element, tag: str) -> list[ET.Element]:
    attribute = _xml_attribute(parent, tag)
    if attribute is None:
        return []
    return [c for c in attribute if _local(c.tag) == "Item"]


def _xml_str(parent: ET.Element, tag: str) -> str | None:
    attribute = _xml_attribute(parent, tag)
    if attribute is None:
        return None
    for value in attribute:
        if _local(value.tag) == "Value" and value.text:
            return value.text.strip()
    return None


def _xml_int(parent: ET.Element, tag: str) -> int | None:
    text = _xml_str(parent, tag)
    return _as_int(text) if text is not None else None
