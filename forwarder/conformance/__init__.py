"""The DICOM Conformance Statement (PS3.2), rendered from the engine's own tables.

``python -m forwarder.conformance`` prints it as Markdown; with a path it writes it there
(``make conformance-statement`` writes ``docs/conformance-statement.md``, which is committed).
tests/test_conformance_statement.py fails when the committed document differs from what this
package renders now, and checks on the wire that what it states is what the engine does.

Every fact the code holds is read from the code, never restated: UIDs and version names, the
presentation contexts :mod:`forwarder.net.contexts` plans, the user information items
:func:`forwarder.net.pdu.encode_associate_rq` puts on the wire, the PDU bounds, every DIMSE status
code run through the sender's own response check and
:func:`forwarder.net.status.classify_status`, the
conversions :mod:`forwarder.dicom.transcode` and :mod:`forwarder.dicom.reencode` perform, the SOP
classes and transfer syntaxes the receiver's engine accepts
(:func:`forwarder.net.receiver.profile`), the TLS settings, and the defaults ``forwarder run``,
``send``, ``echo`` and ``receive`` actually use (built the way those commands build them).
Only what has no table is prose.

The package: :mod:`~forwarder.conformance.engine` gathers those facts from the engine;
:mod:`~forwarder.conformance.markdown` formats cells and tables;
:mod:`~forwarder.conformance.document` renders the whole (:func:`render`) and its opening
sections, :mod:`~forwarder.conformance.scu`, :mod:`~forwarder.conformance.scp` and
:mod:`~forwarder.conformance.config_security` the rest; ``__main__`` is the command line.

This package sits on top, beside :mod:`forwarder.cli`: it reads every layer (the CLI parsers and
``service.association_settings`` included) and nothing imports it. It is no hot path, so it may
import pydicom and pynetdicom freely.
"""

from forwarder.conformance.document import render

__all__ = ["render"]
