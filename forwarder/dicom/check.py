"""The one whole-file check every path uses before it calls a Part 10 file sendable or stored.

:func:`check_file` (``send``, the daemon's ingest through :func:`check_file_values`) and
:func:`scan_file` (``receive``, whose meta header it wrote itself): the meta header read
(:mod:`forwarder.dicom.part10`), then every element of the data set walked
(:class:`forwarder.dicom.scanner.Scanner`), deflated data sets inflated (bounded, so a deflate
bomb is refused), the data set's own SOP Class and Instance UID required. Small files are read
whole, big ones through a window, never mmapped. This module opens files and chooses how they are
read; the walk itself is the scanner's.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from collections.abc import Mapping
from typing import BinaryIO

from forwarder.dicom.part10 import (
    DEFLATED_SYNTAXES,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MAX_META,
    FileMeta,
    parse_meta,
    read_error,
)
from forwarder.dicom.scanner import INTERNAL_KEYS, Scanner
from forwarder.errors import InvalidFileError

#: Files up to this size are read whole; bigger ones through a window, so a CT image's pixel
#: data is skipped, not read (0.5 MB: 39 -> 32 us a check).
IN_MEMORY = 128 * 1024
_WINDOW = 64 * 1024  # the window of a big file: element headers are read, values skipped
#: An inflated data set is held in memory to be walked: bounded, so a deflate bomb is refused.
MAX_INFLATED = 256 * 1024 * 1024
#: One inflation at a time in a process: a receiver's associations each inflating a bomb at once
#: would hold MAX_INFLATED (and twice that while it grows) apiece. Deflated objects are rare;
#: waiting for another one's walk costs little.
_INFLATING = threading.Lock()


def inflate(f: BinaryIO, path: str, offset: int, limit: int = MAX_INFLATED) -> bytearray:
    """The data set of a deflated file (raw deflate from ``offset``), read in chunks, at most
    ``limit`` bytes. After the deflate stream only zero padding or a gzip trailer that matches
    the inflated data (CRC-32 and size, written by some tools; DCMTK ignores it) may follow."""
    f.seek(offset)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        while not inflater.eof:
            chunk = f.read(1 << 20)
            if not chunk:
                raise InvalidFileError(
                    path, "truncated: the deflated data set ends before its deflate stream does"
                )
            while chunk and not inflater.eof:
                out += inflater.decompress(chunk, limit + 1 - len(out))
                if len(out) > limit:
                    raise InvalidFileError(
                        path,
                        f"the deflated data set inflates to more than {limit // (1024 * 1024)} "
                        "MiB; refused (a deflate bomb, or far larger than any deflated object)",
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise InvalidFileError(path, f"the deflated data set is corrupt (zlib: {exc})") from None
    rest = inflater.unused_data + f.read(64)
    if rest.strip(b"\x00"):
        trailer = struct.pack("<II", zlib.crc32(out), len(out) & 0xFFFFFFFF)
        if rest[:8] != trailer or rest[8:].strip(b"\x00"):
            raise InvalidFileError(
                path, "unexpected bytes after the end of the deflated data set's deflate stream"
            )
    if f.read(1):
        raise InvalidFileError(path, "unexpected bytes after the end of the deflated data set")
    return out


def _scan(
    p: str,
    meta: FileMeta | None,
    want: Mapping[int, str],
    vrs: Mapping[int, str],
    data: bytes | bytearray | None = None,
    fd: int | None = None,
) -> tuple[FileMeta, dict[str, str], str, str]:
    """Walk the data set of ``p`` (its meta header read first when ``meta`` is None, from the
    same open file); return the meta header, the wanted values and the data set's own UIDs.
    ``data``: the file's bytes, already in memory (what a receiver just wrote), walked instead
    of reading the file back. ``fd``: ``p`` already open for reading (left open)."""
    wanted = dict(want)
    for tag, key in INTERNAL_KEYS.items():
        wanted.setdefault(tag, key)
    if data is not None and meta is not None:
        ts = meta.transfer_syntax
        if ts in DEFLATED_SYNTAXES:
            with _INFLATING:
                inflated = inflate(io.BytesIO(data), p, meta.dataset_offset)
                scanner = Scanner(inflated, p, True, wanted, vrs)
                scanner.walk(0, False)
                scanner.buf = inflated = bytearray()  # freed before the next one inflates
        else:
            scanner = Scanner(data, p, ts != EXPLICIT_VR_BIG_ENDIAN, wanted, vrs)
            scanner.walk(meta.dataset_offset, ts == IMPLICIT_VR_LITTLE_ENDIAN)
        sop_class, sop_instance = scanner.finish(ts)
        return meta, scanner.found, sop_class, sop_instance
    own = fd is None
    try:
        if fd is None:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # os-level reads: the builtin open() adds an fstat, an lseek and a read to EOF, each
            # a GIL hand-off in a daemon whose threads take turns.
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size <= IN_MEMORY else None
            if meta is None:
                head = os.pread(fd, MAX_META, 0) if data is None else data[:MAX_META]
                meta = parse_meta(head, size, p, peek_uids=False)
            ts = meta.transfer_syntax
            implicit = ts == IMPLICIT_VR_LITTLE_ENDIAN
            little = ts != EXPLICIT_VR_BIG_ENDIAN
            if ts in DEFLATED_SYNTAXES:
                with _INFLATING, open(fd, "rb", closefd=False) as f:
                    inflated = inflate(f, p, meta.dataset_offset)
                    scanner = Scanner(inflated, p, True, wanted, vrs)
                    scanner.walk(0, False)
                    scanner.buf = inflated = bytearray()  # freed before the next one inflates
            elif data is not None:
                scanner = Scanner(data, p, little, wanted, vrs)
                scanner.walk(meta.dataset_offset, implicit)
            else:
                # Never mmap: a file cut by another program meanwhile would kill us (SIGBUS).
                window = bytearray(_WINDOW)
                scanner = Scanner(window, p, little, wanted, vrs, fd=fd, size=size)
                scanner.walk(meta.dataset_offset, implicit)
        finally:
            if own:
                os.close(fd)
    except OSError as exc:
        raise read_error(p, exc, "cannot read") from None
    sop_class, sop_instance = scanner.finish(ts)
    return meta, scanner.found, sop_class, sop_instance


def scan_file(
    path: str | os.PathLike[str],
    meta: FileMeta,
    want: Mapping[int, str] | None = None,
    vrs: Mapping[int, str] | None = None,
    *,
    data: bytes | bytearray | None = None,
) -> dict[str, str]:
    """Check the whole data set of a Part 10 file is well formed and complete, and return the
    top-level values of ``want`` (tag -> keyword) as text (multiple values joined by ``\\``).
    ``vrs`` (tag -> VR) tells how to read wanted values of implicit VR data sets.

    Raises :class:`InvalidFileError` naming what is wrong: truncated, a length past the end, an
    undefined length without its delimiter, an invalid VR, bytes that do not match the transfer
    syntax (pixel data encapsulated under a native syntax or the reverse), a corrupt or
    oversized deflate stream, or no valid SOP Class / Instance UID in the data set itself.
    Deflated data sets are inflated (at most :data:`MAX_INFLATED` bytes) and walked.
    ``data``, when given, is the whole file's bytes already in memory (a receiver keeps a copy
    of a small object as it writes it): walked instead of reading the file back.
    """
    p = os.fspath(path)
    if meta.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN and want and vrs is None:
        # Implicit VR values need the data dictionary to be read (US Rows is binary).
        from pydicom.datadict import dictionary_VR

        vrs = {tag: dictionary_VR(tag).split(" or ")[0] for tag in want}
    _, found, _, _ = _scan(p, meta, want or {}, vrs or {}, data)
    return found


def check_file(path: str | os.PathLike[str]) -> FileMeta:
    """The one check every path uses: :func:`read_meta` and the whole-data-set scan of
    :func:`scan_file`. The returned SOP Class and Instance UID are the data set's own (they win
    over the meta header's, as DCMTK's dcmsend sends them), deflated files included.

    Raises :class:`InvalidFileError` (:class:`UnreadableFileError` when it cannot be read).
    """
    return check_file_values(path)[0]


def check_file_values(
    path: str | os.PathLike[str],
    want: Mapping[int, str] | None = None,
    vrs: Mapping[int, str] | None = None,
    *,
    fd: int | None = None,
) -> tuple[FileMeta, dict[str, str]]:
    """:func:`check_file`, also returning the top-level values of ``want`` as
    :func:`scan_file` does (``vrs`` as there): one open and one walk (the daemon's ingest).
    ``fd``: the file already open for reading (the daemon's ingest then fsyncs it through the
    same descriptor); it is left open."""
    p = os.fspath(path)
    meta, found, sop_class, sop_instance = _scan(p, None, want or {}, vrs or {}, fd=fd)
    checked = FileMeta(
        sop_class, sop_instance, meta.transfer_syntax, meta.dataset_offset, meta.size
    )
    return checked, found
