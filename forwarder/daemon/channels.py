"""Which channel a destination gets, and what the senders need of one.

A destination with ``ae_title``/``host``/``port`` gets a C-STORE
:class:`~forwarder.net.channel.Channel`; one with ``url`` a STOW-RS
:class:`~forwarder.dicomweb.channel.StowChannel`. Both satisfy :class:`SendChannel`, the part of
the interface the daemon's workers and ``forwarder send`` drive, so neither knows which kind it
holds. This module builds channels; it does not send.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from forwarder.errors import AssociationError
from forwarder.net.association import AssociationSettings, Peer
from forwarder.net.channel import Channel, SendOutcome, StoreRequest

if TYPE_CHECKING:  # pydantic is imported only where a config is read (send: not always)
    from forwarder.config import Destination


class SendChannel(Protocol):
    """One reusable connection slot to one destination, driven by one thread."""

    name: str
    down: AssociationError | None
    associations_opened: int

    @property
    def is_open(self) -> bool: ...
    @property
    def last_progress(self) -> float | None: ...
    def send(
        self, requests: Iterable[StoreRequest], *, hint: Sequence[tuple[str, str]] = ()
    ) -> Iterator[SendOutcome]: ...
    def release(self) -> None: ...
    def abort(self) -> None: ...
    def release_if_idle(self, idle_timeout: float) -> bool: ...
    def open(self, needs: Sequence[tuple[str, str]]) -> bool: ...


def destination_peer(destination: Destination) -> Peer:
    """The C-STORE peer of a DIMSE destination (an empty one for a DICOMweb destination)."""
    return Peer(destination.host or "", destination.port or 0, destination.ae_title or "")


def open_channel(destination: Destination, settings: AssociationSettings, name: str) -> SendChannel:
    """A channel for ``destination``; ``settings`` carries its timeouts and TLS context (built
    by the service from the destination, so unusable TLS material stops the start)."""
    if destination.url is None:
        return Channel(
            destination_peer(destination),
            settings,
            allow_lossy_decompress=destination.allow_lossy_decompress,
            name=name,
        )
    from forwarder.dicomweb.channel import StowChannel  # urllib3: only for DICOMweb
    from forwarder.dicomweb.http import web_settings

    return StowChannel(
        web_settings(destination, settings.tls, settings.pacer, settings.stop), name=name
    )
