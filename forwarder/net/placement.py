"""Where a received object lands: ``output/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, atomically.

The receiver's folder writer (an :class:`~forwarder.net.scp_object.ObjectSink`): the checked,
fsynced file the engine wrote in ``output`` is renamed into its study folder, and the folder is
fsynced, so the object appears whole or not at all and survives a crash once Success is
answered. UIDs are sanitised so that nothing a peer sends can name a path outside ``output``, no
symlink inside ``output`` is followed, and an object whose data set has no Study Instance UID
lands as ``output/no-study-uid/<SOPInstanceUID>.dcm``, so a resend replaces it.

Not here: receiving and checking (:mod:`forwarder.net.scp_object`), the server
(:mod:`forwarder.net.receiver`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import uuid
from pathlib import Path

from forwarder.net.scp_object import (
    BASE_WANTED,
    STATUS_OUT_OF_RESOURCES,
    SUCCESS,
    Answer,
    Origin,
    ReceivedObject,
    shown,
    syntax_name,
    write_error_reason,
)

logger = logging.getLogger(__name__)

#: The folder for objects whose data set has no Study Instance UID (not a UID, so it cannot
#: clash with one; fixed, so a resend replaces the object instead of adding a copy).
NO_STUDY_FOLDER = "no-study-uid"

_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_MAX_UID_LENGTH = 64


def safe_uid_name(value: str | None) -> str:
    """A file-name-safe stand-in for a UID received from a peer.

    A UID made of digits separated by single dots (at most 64 characters, trailing space/NUL
    padding removed) is used as it is: such a name cannot be empty, ``.``, ``..`` or hold a
    ``/``. Anything else is replaced by a ``2.25.<decimal>`` UID: derived from a hash of the
    value (the same bad value always maps to the same name, so a resend overwrites) or random
    when the value is empty.
    """
    text = (value or "").strip(" \x00")
    if len(text) <= _MAX_UID_LENGTH and _UID_RE.fullmatch(text):
        return text
    if not text:
        return f"2.25.{uuid.uuid4().int}"
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


class FolderSink:
    """Files checked objects under ``output`` (the spool is ``output`` itself: same
    filesystem, so placing is a rename; the partial files are dot-files)."""

    def __init__(self, output: Path) -> None:
        self._output = output
        self._lock = threading.Lock()
        self._received = 0

    @property
    def spool(self) -> Path:
        return self._output

    @property
    def wanted(self) -> tuple[dict[int, str], dict[int, str]]:
        return BASE_WANTED

    @property
    def received(self) -> int:
        with self._lock:
            return self._received

    def accept(self, path: str, obj: ReceivedObject, origin: Origin) -> Answer:
        study_value = obj.study_instance_uid
        study = safe_uid_name(study_value) if study_value else NO_STUDY_FOLDER
        name = safe_uid_name(obj.sop_instance_uid) + ".dcm"
        try:
            self._place(path, study, name)
        except OSError as exc:
            reason = write_error_reason(exc)
            logger.error(
                "cannot store SOP Instance %s from %s at %s/%s/%s: %s (%s); answering 0x%04X",
                shown(obj.sop_instance_uid),
                origin.calling_ae,
                self._output,
                study,
                name,
                reason,
                exc.strerror or exc,
                STATUS_OUT_OF_RESOURCES,
            )
            return Answer(STATUS_OUT_OF_RESOURCES, f"cannot store: {reason}")
        with self._lock:
            self._received += 1
        if not logger.isEnabledFor(logging.INFO):
            return SUCCESS
        logger.info(
            "stored %s from %s at %s/%s/%s (%s, %d bytes)",
            shown(obj.sop_instance_uid),
            origin.calling_ae,
            self._output,
            study,
            name,
            syntax_name(obj.transfer_syntax),
            obj.size,
        )
        return SUCCESS

    def _place(self, source: str, study: str, name: str) -> None:
        place(self._output, source, study, name)


#: Tries at placing one object when its study folder vanishes under it (see :func:`place`).
_PLACE_ATTEMPTS = 3


def place(output: str | os.PathLike[str], source: str, study: str, name: str) -> None:
    """Make ``source`` appear atomically as ``output/study/name`` (fsynced, no symlinks; the
    study folder is made when it is new, and ``output`` fsynced). A study folder removed while
    this runs (the daemon's finisher prunes the empty ones of the listener) is made again."""
    out_fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for attempt in range(_PLACE_ATTEMPTS):
            try:
                _place_in(out_fd, source, study, name)
                return
            except FileNotFoundError:
                # Renaming into a folder removed since it was opened fails so; a missing
                # source is a real error.
                if attempt == _PLACE_ATTEMPTS - 1 or not os.path.lexists(source):
                    raise
    finally:
        os.close(out_fd)


def _place_in(out_fd: int, source: str, study: str, name: str) -> None:
    # O_NOFOLLOW: a symlink in place of the study folder fails with ELOOP.
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        study_fd = os.open(study, flags, dir_fd=out_fd)
    except FileNotFoundError:
        try:
            os.mkdir(study, 0o777, dir_fd=out_fd)
        except FileExistsError:  # another association made it meanwhile
            pass
        study_fd = os.open(study, flags, dir_fd=out_fd)
    except NotADirectoryError as exc:  # a symlink to a file, or a file
        raise OSError(errno.ELOOP, "the study folder is not a folder", study) from exc
    try:
        try:
            os.rename(source, name, dst_dir_fd=study_fd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # a study folder mounted from elsewhere
                raise
            _copy(source, study_fd, name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(source)  # copied and renamed into place: the source goes
        try:
            os.fsync(study_fd)  # the rename survives a crash
            # And the study folder's own entry: made by this call, or by another association a
            # moment ago that may not have fsynced it yet (cheap when nothing is dirty).
            os.fsync(out_fd)
        except OSError:
            # Not durable: it must not stay placed while the peer is told it was not
            # stored (and a daemon watching the folder would take it).
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=study_fd)
            raise
    finally:
        os.close(study_fd)


def _copy(source: str, study_fd: int, name: str) -> None:
    """Copy into a dot-file beside the target, fsync it, then rename it over the target."""
    part = f".{name}.{secrets.token_hex(4)}.part"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    dst_fd = os.open(part, flags, 0o666, dir_fd=study_fd)
    try:
        with open(source, "rb") as src, open(dst_fd, "wb", closefd=False) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst_fd)
        os.close(dst_fd)
        dst_fd = -1
        os.rename(part, name, src_dir_fd=study_fd, dst_dir_fd=study_fd)
    except BaseException:
        if dst_fd >= 0:
            os.close(dst_fd)
        with contextlib.suppress(OSError):
            os.unlink(part, dir_fd=study_fd)
        raise
