"""Re-encoding a file for a peer that does not accept its transfer syntax.

This is the slow path, to Explicit or Implicit VR Little Endian only. Uncompressed sources
(big endian and deflated included) are converted byte by byte, no value decoded
(:mod:`forwarder.dicom.reencode`: binary values swapped by their element size, whatever cannot be
swapped with certainty refused with the reason, never guessed); this module reads them and
chooses the conversion. Compressed sources are decoded with pydicom, their pixel data
decompressed (pydicom's RLE decoder, the pylibjpeg plugins), and re-encoded. Lossy sources are
refused unless explicitly allowed, since decompressing them to a lossless syntax would hide that
the pixels were already degraded.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from forwarder.dicom.check import inflate
from forwarder.dicom.part10 import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    read_meta,
)
from forwarder.dicom.reencode import (
    UnconvertibleError,
    big_to_little_endian,
    reencode_little_endian,
)
from forwarder.errors import InvalidFileError, SendError, UnreadableFileError

logger = logging.getLogger(__name__)

_NATIVE_SOURCES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
    }
)

#: Transfer syntaxes whose pixel data is known to be lossless (PS3.5 Table A-1). Any other
#: compressed syntax, including one forwarder does not know, is possibly lossy.
LOSSLESS_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.58",  # JPEG Lossless, Non-Hierarchical (Process 15) (retired)
        "1.2.840.10008.1.2.4.65",  # JPEG Lossless, Hierarchical (Process 28) (retired)
        "1.2.840.10008.1.2.4.66",  # JPEG Lossless, Hierarchical (Process 29) (retired)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component (Lossless Only)
        "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless (.111, JPEG recompression, keeps a
        # lossy JPEG's pixels; .112 may be lossy)
        "1.2.840.10008.1.2.4.201",  # HTJ2K (Lossless Only)
        "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL Options (Lossless Only)
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.7.1",  # SMPTE ST 2110-20 Uncompressed Progressive Active Video
        "1.2.840.10008.1.2.7.2",  # SMPTE ST 2110-20 Uncompressed Interlaced Active Video
        "1.2.840.10008.1.2.7.3",  # SMPTE ST 2110-30 PCM Digital Audio
        "1.2.840.10008.1.2.8.1",  # Deflated Image Frame Compression
    }
)


def possibly_lossy(transfer_syntax: str) -> bool:
    """Whether pixel data in ``transfer_syntax`` may have been compressed lossily: every syntax
    that is neither uncompressed nor in :data:`LOSSLESS_SYNTAXES` (JPEG baseline and extended,
    retired lossy JPEG processes, JPEG-LS near-lossless, JPEG 2000 and HTJ2K that are not
    "lossless only", JPEG XL, video, JPIP-referenced pixels, syntaxes unknown to forwarder)."""
    return transfer_syntax not in _NATIVE_SOURCES and transfer_syntax not in LOSSLESS_SYNTAXES


#: pydicom logs a decoder's failure with a traceback before raising it; forwarder reports the
#: exception in one line, so pydicom's logger is held quiet while it decodes.
_PYDICOM_LOGGER = logging.getLogger("pydicom")
_quiet_lock = threading.Lock()
_quiet_count = 0
_quiet_saved_level = logging.NOTSET


@contextmanager
def _pydicom_quiet() -> Iterator[None]:
    """Raise pydicom's log level for the duration (nested and concurrent uses share one raise;
    the last one out restores the level)."""
    global _quiet_count, _quiet_saved_level
    with _quiet_lock:
        if _quiet_count == 0:
            _quiet_saved_level = _PYDICOM_LOGGER.level
            _PYDICOM_LOGGER.setLevel(logging.CRITICAL + 1)
        _quiet_count += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_count -= 1
            if _quiet_count == 0:
                _PYDICOM_LOGGER.setLevel(_quiet_saved_level)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
        meta = read_meta(path)
    except UnreadableFileError as exc:  # an I/O error: tried again later, as everywhere
        raise SendError(f"cannot read {path}: {exc.reason}", retryable=True) from None
    except InvalidFileError as exc:
        raise SendError(
            f"cannot decode {path} for transcoding: {exc.reason}", retryable=False
        ) from None
    if meta.transfer_syntax in _NATIVE_SOURCES:
        return _convert_uncompressed(
            path, meta.transfer_syntax, meta.dataset_offset, target_syntax, lead
        )
    try:
        with _pydicom_quiet():
            ds = dcmread(path)
    except Exception as exc:
        raise SendError(
            f"cannot decode {path} for transcoding: {_one_line(exc)}", retryable=False
        ) from None
    source = str(ds.file_meta.TransferSyntaxUID)
    if possibly_lossy(source) and not allow_lossy:
        lossless_flag = str(ds.get("LossyImageCompression", "")) == "00"
        if not lossless_flag:
            raise SendError(
                f"{lead}the file is {syntax_name(source)}, possibly lossy; decompressing it "
                "needs --allow-lossy-decompress (allow_lossy_decompress: true)",
                retryable=False,
            )
    try:
        with _pydicom_quiet():
            if UID(source).is_compressed and "PixelData" in ds:
                # Keep the SOP Instance UID: a router forwards the same object, not a new one.
                ds.decompress(generate_instance_uid=False)
            data = _write_little_endian(ds, target_syntax)
    except Exception as exc:
        raise SendError(
            f"{lead}cannot convert {syntax_name(source)} to {syntax_name(target_syntax)}: "
            f"{_one_line(exc)} (is a decoder plugin for this syntax installed?)",
            retryable=False,
        ) from None
    logger.debug("transcoded %s from %s to %s (%d bytes)", path, source, target_syntax, len(data))
    return data


def _write_little_endian(ds: Dataset, target_syntax: str) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = target_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(out, ds)
    return bytes(out.getvalue())


def _convert_uncompressed(
    path: str, source_syntax: str, offset: int, target_syntax: str, lead: str
) -> bytes:
    """Byte-level conversion between the uncompressed syntaxes: no value is decoded, so none
    is reformatted or lost; binary values are swapped when the source is big endian."""
    what = f"{syntax_name(source_syntax)} to {syntax_name(target_syntax)}"
    try:
        with open(path, "rb") as f:
            if source_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                data = bytes(inflate(f, path, offset))
            else:
                f.seek(offset)
                data = f.read()
    except InvalidFileError as exc:
        raise SendError(f"{lead}cannot convert {what}: {exc.reason}", retryable=False) from None
    except OSError as exc:
        raise SendError(f"cannot read {path}: {exc.strerror or exc}", retryable=True) from None
    implicit = source_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    to_implicit = target_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    try:
        if source_syntax == EXPLICIT_VR_BIG_ENDIAN:
            data = big_to_little_endian(data)
        if implicit != to_implicit:
            data = reencode_little_endian(data, implicit, to_implicit)
    except UnconvertibleError as exc:
        raise SendError(f"{lead}cannot convert {what}: {exc}", retryable=False) from None
    logger.debug("transcoded %s from %s (%d bytes)", path, what, len(data))
    return data
