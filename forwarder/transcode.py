"""Re-encoding a file for a peer that does not accept its transfer syntax.

This is the slow path: the whole data set is decoded with pydicom (pixel data decompressed by
pydicom's RLE decoder or the pylibjpeg plugins) and encoded in an uncompressed syntax. Lossy
sources are refused unless explicitly allowed, since decompressing them to a lossless syntax would
hide that the pixels were already degraded.
"""

from __future__ import annotations

import logging

from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from forwarder.dicomfile import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from forwarder.errors import SendError

logger = logging.getLogger(__name__)

#: Transfer syntaxes whose pixel data may have been compressed lossily.
LOSSY_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossless or lossy)
        "1.2.840.10008.1.2.4.203",  # HTJ2K (lossless or lossy)
        "1.2.840.10008.1.2.4.100",  # MPEG2 and the video syntaxes after it
        "1.2.840.10008.1.2.4.101",
        "1.2.840.10008.1.2.4.102",
        "1.2.840.10008.1.2.4.103",
        "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105",
        "1.2.840.10008.1.2.4.106",
        "1.2.840.10008.1.2.4.107",
        "1.2.840.10008.1.2.4.108",
    }
)


def syntax_name(uid: str) -> str:
    """``JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50)`` or the bare UID."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def transcode(path: str, target_syntax: str, *, allow_lossy: bool, context: str = "") -> bytes:
    """Return the data set of ``path`` encoded in ``target_syntax`` (an uncompressed syntax).

    Raises :class:`SendError` (not retryable) when the file cannot be converted; ``context``
    (the SOP class and what the peer accepted) leads its message.
    """
    lead = f"{context}; " if context else ""
    if target_syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        raise ValueError(f"can only transcode to an uncompressed syntax, not {target_syntax}")
    try:
        ds = dcmread(path)
    except Exception as exc:
        raise SendError(f"cannot decode {path} for transcoding: {exc}", retryable=False) from None
    source = str(ds.file_meta.TransferSyntaxUID)
    if source in LOSSY_SYNTAXES and not allow_lossy:
        lossless_flag = str(ds.get("LossyImageCompression", "")) == "00"
        if not lossless_flag:
            raise SendError(
                f"{lead}the file is {syntax_name(source)}, possibly lossy; decompressing it "
                "needs --allow-lossy-decompress (allow_lossy_decompress: true)",
                retryable=False,
            )
    try:
        if UID(source).is_compressed and "PixelData" in ds:
            # Keep the SOP Instance UID: a router forwards the same object, not a new one.
            ds.decompress(generate_instance_uid=False)
        out = DicomBytesIO()
        out.is_little_endian = True
        out.is_implicit_VR = target_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        write_dataset(out, ds)
    except Exception as exc:
        raise SendError(
            f"{lead}cannot convert {syntax_name(source)} to {syntax_name(target_syntax)}: {exc} "
            "(is a decoder plugin for this syntax installed?)",
            retryable=False,
        ) from None
    data = bytes(out.getvalue())
    logger.debug("transcoded %s from %s to %s (%d bytes)", path, source, target_syntax, len(data))
    return data
