"""The health probe of a destination that is down: C-ECHO, or a QIDO-RS GET for DICOMweb.

:func:`probe` answers None when the peer is back (C-ECHO Success; HTTP 2xx to
``GET {url}/studies?limit=1``), else why not, in one phrase for the log and ``status``. No file
is sent and none is charged: while a destination is down (:mod:`forwarder.daemon.destination_state`)
its workers claim nothing and only probe, with backoff.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from forwarder.daemon.channels import destination_peer
from forwarder.errors import ForwarderError
from forwarder.net.association import Association, AssociationSettings
from forwarder.net.pdu import VERIFICATION_SOP_CLASS, ProposedContext

if TYPE_CHECKING:
    from forwarder.config import Destination

_VERIFICATION = ProposedContext(VERIFICATION_SOP_CLASS, ("1.2.840.10008.1.2",))


def probe(destination: Destination, settings: AssociationSettings) -> str | None:
    """None when ``destination`` answers Success now; otherwise why it does not."""
    if destination.url is not None:
        return _probe_web(destination, settings)
    peer = destination_peer(destination)
    try:
        assoc = Association.request(peer, settings, [_VERIFICATION])
    except ForwarderError as exc:
        return str(exc)
    try:
        response = assoc.echo()
    except ForwarderError as exc:
        return f"C-ECHO: {exc}"
    finally:
        assoc.release()
    if response.status != 0x0000:
        return f"C-ECHO answered status 0x{response.status:04X}"
    return None


def _probe_web(destination: Destination, settings: AssociationSettings) -> str | None:
    from forwarder.dicomweb.http import WebClient, web_settings  # urllib3: DICOMweb only

    client = WebClient(web_settings(destination, settings.tls, stop=settings.stop))
    try:
        reply = client.get("/studies?limit=1")
    except ForwarderError as exc:
        return str(exc)
    finally:
        client.close()
    if 200 <= reply.status < 300:
        return None
    return f"QIDO-RS probe answered HTTP {reply.status} {reply.reason}"
