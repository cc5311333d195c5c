"""The check of a DICOMweb service URL, shared by the config (``url:``) and ``forwarder send
URL``; in a module of its own so that a send never imports the config's models (pydantic)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


def check_url(value: Any) -> str:
    """``value`` as a service root (stripped, no trailing ``/``); ValueError saying what is
    wrong with it otherwise."""
    if not isinstance(value, str):
        raise ValueError("must be an http:// or https:// URL")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// or https:// URL with a host, e.g. https://pacs.example.org/dicom-web"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(
            "must not hold a query, a fragment or credentials (credentials go under auth:)"
        )
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("has a bad port number") from None
    return value.strip().rstrip("/")
