"""The STOW-RS request body: ``multipart/related; type="application/dicom"``, streamed from disk.

Each part is one Part 10 file exactly as it is on disk (preamble, meta header, data set): no
decode, no re-encode; a changed object (modify, deidentify) is its new meta header and data set,
its pixel data still streamed from the file. The body is produced in chunks of :data:`CHUNK`
bytes while it is sent, so memory stays flat whatever the size of the files; its length is
known up front (from the sizes the files had when the batch was planned), so it is sent with a
``Content-Length`` rather than chunked. A file that changes size while it is read (being
rewritten) stops the body with :class:`BodyError`: a truncated or mixed object is never sent as
if it were whole.

What this module does not do: decide which files go together (the channel does) or send
anything (``http`` does).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forwarder.errors import ForwarderError, InvalidFileError

if TYPE_CHECKING:
    from forwarder.dicom.edit import EditedObject

CHUNK = 1024 * 1024  # bytes read from a file and handed to the socket at a time
CRLF = b"\r\n"


class BodyError(ForwarderError):
    """A file could not be read as planned while the body was being sent."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True, slots=True)
class Part:
    """One file of the body, with the size it had when the batch was planned."""

    path: str
    size: int
    # A changed object (modify, deidentify): its new meta header and data set are sent, the
    # pixel data streamed from ``path``; ``size`` is then the part's length.
    edited: EditedObject | None = None


class MultipartBody:
    """An iterable of ``bytes`` chunks, reusable (each iteration reads the files again)."""

    def __init__(
        self,
        parts: Sequence[Part],
        *,
        boundary: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        if not parts:
            raise ValueError("a STOW-RS request needs at least one part")
        self.parts = tuple(parts)
        self.boundary = boundary or f"forwarder-{uuid.uuid4().hex}"
        self._on_progress = on_progress
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"--{self.boundary}--\r\n".encode()
        #: Parts handed whole (their bytes and the CRLF that ends them) to the consumer of the
        #: last iteration. A server may answer before reading the whole body (urllib3 then
        #: ignores the broken pipe and reads its answer): it cannot have stored a part that
        #: never left, whatever its answer says.
        self.sent_whole = 0

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    @property
    def length(self) -> int:
        """The exact number of bytes :meth:`__iter__` yields."""
        per_part = len(self._head) + len(CRLF)
        return sum(p.size + per_part for p in self.parts) + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        self.sent_whole = 0
        for part in self.parts:
            yield self._head
            yield from self._file(part)
            yield CRLF
            self.sent_whole += 1  # runs once the consumer took the CRLF and asks for more
        yield self._tail

    def _file(self, part: Part) -> Iterator[bytes]:
        if part.edited is not None:
            yield from self._edited(part, part.edited)
            return
        try:
            fd = os.open(part.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise BodyError(part.path, f"cannot read it: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size != part.size:
                raise BodyError(
                    part.path, f"the file changed ({part.size} bytes planned, {size} now)"
                )
            left = size
            while left > 0:
                try:
                    chunk = os.read(fd, min(CHUNK, left))
                except OSError as exc:
                    raise BodyError(part.path, f"read error: {exc.strerror}") from None
                if not chunk:
                    raise BodyError(part.path, f"the file shrank while being sent ({left} short)")
                left -= len(chunk)
                if self._on_progress is not None:
                    self._on_progress(len(chunk))
                yield chunk
        finally:
            os.close(fd)

    def _edited(self, part: Part, obj: EditedObject) -> Iterator[bytes]:
        yield obj.file_meta
        try:
            for chunk in obj.chunks(CHUNK):
                if self._on_progress is not None:
                    self._on_progress(len(chunk))
                yield chunk
        except InvalidFileError as exc:
            raise BodyError(part.path, exc.reason) from None
