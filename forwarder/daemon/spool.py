"""Moving finished files out of incoming: to ``done/`` or to ``failed/`` with ``NAME.error.json``.

The relative path under incoming is kept; a name clash gets a numeric suffix (``a.dcm`` ->
``a.1.dcm``). Moves are renames when the folders share a filesystem, else copy + fsync + rename +
unlink; the folders touched are fsynced, so after a power loss a file is in exactly one place (or,
at worst, in both, never in none). Nothing is ever deleted on failure.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forwarder.daemon.noreplace import rename_noreplace, same_file
from forwarder.errors import ForwarderError, SetupError

logger = logging.getLogger(__name__)


class SpoolError(ForwarderError):
    """A file could not be moved (disk full, permissions); it stays where it was."""


class SourceGoneError(SpoolError):
    """The file to move is not there (moved or removed by someone else)."""


class TargetTakenError(SpoolError):
    """Another file is at the name chosen for a move (put there since the name was picked):
    it is not replaced, and the file to move stays where it was. Pick another name."""


@dataclass(frozen=True, slots=True)
class DestinationResult:
    """One destination's outcome for ``NAME.error.json``."""

    destination: str
    outcome: str  # "stored" or "failed"
    status: int | None
    error: str | None
    attempts: int
    first_queued: float | None
    finished: float | None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


#: A path as text or as a Path: the finisher works on text (pathlib's parsing, hashing and
#: comparing were a quarter of the finishing process's CPU an object in a modality's push).
StrPath = str | os.PathLike[str]


def _rename(source: StrPath, target: StrPath) -> None:
    """A rename that replaces nothing (:func:`rename_noreplace`: FileExistsError when the
    target is taken), creating the target's folders when they are missing (tried first: in the
    usual case they exist, and a mkdir per file costs a system call for nothing)."""
    try:
        rename_noreplace(source, target)
    except FileNotFoundError:
        if not os.path.lexists(source):
            raise
        os.makedirs(os.path.dirname(target), exist_ok=True)
        rename_noreplace(source, target)


def fsync_dir(path: StrPath) -> None:
    """Make a rename or create in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_whole(
    path: Path, data: bytes, *, sync_dir: bool = False, replace: bool = True
) -> os.stat_result:
    """Make ``data`` appear at ``path`` whole or not at all, whenever a crash or a full disk
    stops it: written to ``.NAME.tmp`` beside it, fsynced, renamed over ``path`` (folders
    created); with ``sync_dir`` the folder is fsynced too, else the caller does (the finisher,
    once a batch). Without ``replace``, nothing at ``path`` is replaced: a name taken raises
    :class:`TargetTakenError`. Returns the stat of the file written (its inode is the one at
    ``path`` now). Raises :class:`SpoolError`, the temp file removed; ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            written = os.fstat(f.fileno())
        if replace:
            # Replacing on purpose: what is at ``path`` is a report this writes again (a move
            # retried after a crash, `forwarder retry` putting one back).
            os.rename(tmp, path)
        else:
            rename_noreplace(tmp, path)
    except FileExistsError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TargetTakenError(
            f"cannot write {path}: another report is there (put there after the name was "
            "chosen); it is not replaced"
        ) from None
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise SpoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    if sync_dir:
        fsync_dir(path.parent)
    return written


def drop_written(path: StrPath, written: os.stat_result) -> None:
    """Remove ``path`` if it is still the file :func:`write_whole` wrote (``written``): a
    report written beside a name another file took goes, one that file's writer put there
    stays."""
    with contextlib.suppress(OSError):
        if os.path.samestat(os.lstat(path), written):
            os.unlink(path)


#: Names tried for one file whose chosen name keeps being taken before the move (by another
#: writer in done/ or failed/); then it stays where it is and the error says so.
TAKEN_TRIES = 5

#: The folder under incoming where the listener stages what it receives, one sub-folder per
#: calling AE title (a dot-folder: the watcher never takes anything from it).
LISTEN_FOLDER = ".listen"
LISTEN_PREFIX = LISTEN_FOLDER + "/"


class Spool:
    """The incoming, done and failed folders."""

    def __init__(self, incoming: Path, done: Path, failed: Path) -> None:
        self.incoming = incoming
        self.done = done
        self.failed = failed
        for role, folder in self._folders():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SetupError(_not_writable(role, folder, exc, "cannot create it")) from None

    def _folders(self) -> tuple[tuple[str, Path], ...]:
        return (("incoming", self.incoming), ("done", self.done), ("failed", self.failed))

    def check_writable(self) -> None:
        """Raise :class:`SetupError` unless a file can be created in each folder. The daemon
        calls it at start: a read-only ``done/`` (a read-only mount, or a folder outside the
        systemd unit's ReadWritePaths=) would otherwise only show when the first file is
        finished, and then on every retry."""
        for role, folder in self._folders():
            try:
                _probe_write(folder)
            except OSError as exc:
                what = "cannot create a file in it"
                raise SetupError(_not_writable(role, folder, exc, what)) from None

    def rel_path(self, path: StrPath) -> str:
        """``path`` relative to incoming; a file the listener staged under
        ``incoming/.listen/`` is named without that folder (it goes to ``done/CALLING_AE/...``)."""
        text = os.fspath(path)
        prefix = os.path.join(self.incoming, "")
        if text.startswith(prefix) and "//" not in text and "/./" not in text:
            rel = text[len(prefix) :]  # as below, without pathlib (once per received object)
        else:
            rel = Path(text).relative_to(self.incoming).as_posix()
        if rel.startswith(LISTEN_PREFIX):
            return rel[len(LISTEN_PREFIX) :]
        return rel

    def target(self, rel_path: str, failed: bool) -> Path:
        """A free path for ``rel_path`` under done/ or failed/ (numeric suffix on a clash)."""
        return Path(self.free_path(rel_path, failed))

    def free_path(self, rel_path: str, failed: bool, taken: AbstractSet[str] = frozenset()) -> str:
        """:meth:`target` as text; ``taken`` are paths already promised to other files of the
        same batch."""
        base = os.path.join(self.failed if failed else self.done, rel_path)
        candidate = base
        n = 0
        while (
            candidate in taken
            or os.path.lexists(candidate)
            or (failed and os.path.lexists(candidate + ERROR_SUFFIX))
        ):
            n += 1
            folder, name = os.path.split(base)
            candidate = os.path.join(folder, numbered(name, n))
        return candidate

    def move(self, source: StrPath, target: StrPath, *, sync: bool = True) -> None:
        """Move ``source`` to ``target`` (parents created), never replacing what is there.
        Raises :class:`TargetTakenError` when another file is at ``target``,
        :class:`SourceGoneError` when ``source`` is not there, :class:`SpoolError` for the
        rest; ``source`` stays where it was. A target that already is ``source`` (two names of
        one file, or the same bytes: a move killed half way, see :mod:`.noreplace`) counts as
        moved: the name in the source folder goes."""
        try:
            try:
                _rename(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy_across(Path(source), Path(target), sync=sync)
                os.unlink(source)
        except FileExistsError:
            if not _moved_already(source, target):
                raise TargetTakenError(
                    f"cannot move {source} to {target}: another file is there (put there after "
                    "the name was chosen); it is not replaced, and the file stays in place"
                ) from None
            try:
                os.unlink(source)
            except OSError as exc:
                raise SpoolError(
                    f"cannot remove {source}, already at {target}: {exc.strerror or exc}"
                ) from None
        except OSError as exc:
            if exc.errno == errno.ENOENT and not os.path.lexists(source):
                raise SourceGoneError(f"cannot move {source}: it is gone") from None
            raise SpoolError(
                f"cannot move {source} to {target}: {exc.strerror or exc}; it stays in place"
            ) from None
        if sync:
            fsync_dir(os.path.dirname(target))
            fsync_dir(os.path.dirname(source))

    def write_error(
        self,
        target: Path,
        rel_path: str,
        reason: str,
        results: Sequence[DestinationResult] = (),
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``target``'s ``.error.json`` (atomically: temp file, fsync, rename), replacing
        a report there."""
        path = _error_path(target)
        self.write_report(target, rel_path, reason, results, extra, replace=True)
        return path

    def write_report(
        self,
        target: Path,
        rel_path: str,
        reason: str,
        results: Sequence[DestinationResult] = (),
        extra: dict[str, Any] | None = None,
        *,
        replace: bool,
    ) -> os.stat_result:
        """:meth:`write_error`; without ``replace``, a report already at the name is not
        replaced (:class:`TargetTakenError`: another file took the name, with its report).
        Returns the stat of the report written (for :func:`drop_written`)."""
        doc: dict[str, Any] = {
            "file": rel_path,
            "reason": reason,
            "failed_at": _iso(time.time()),
            "destinations": [
                {
                    "destination": r.destination,
                    "outcome": r.outcome,
                    "status": f"0x{r.status:04X}" if r.status is not None else None,
                    "error": r.error,
                    "attempts": r.attempts,
                    "first_queued": _iso(r.first_queued),
                    "finished": _iso(r.finished),
                }
                for r in results
            ],
        }
        if extra:
            doc.update(extra)
        data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
        return write_whole(_error_path(target), data, replace=replace)

    def reject(
        self,
        source: Path,
        reason: str,
        extra: dict[str, Any] | None = None,
        target: Path | None = None,
    ) -> Path:
        """Move a file that is not queued (not DICOM, no route) to failed/ with its reason
        (to ``target``: a path :meth:`target` chose, which the queue recorded first; another
        free name when a file or a report was put there since). Returns where it went."""
        rel = self.rel_path(source)
        target = self.target(rel, failed=True) if target is None else target
        for attempt in range(TAKEN_TRIES):
            written: os.stat_result | None = None
            try:
                # Never replacing: the name was chosen free of reports, so one there now is
                # another file's (the listener's reject in another process, another writer).
                written = self.write_report(target, rel, reason, extra=extra, replace=False)
                self.move(source, target)
                return target
            except TargetTakenError:
                if written is not None:  # ours, beside another file: it goes with the name
                    drop_written(_error_path(target), written)
                if attempt == TAKEN_TRIES - 1:
                    raise
                target = self.target(rel, failed=True)
        raise AssertionError("unreachable")  # pragma: no cover

    def discard(self, source: Path, target: Path | None = None) -> Path:
        """Move a file that a discard route matched straight to done/ (not queued, nothing
        sent; to ``target`` as in :meth:`reject`). The caller logs which route."""
        rel = self.rel_path(source)
        target = self.target(rel, failed=False) if target is None else target
        for attempt in range(TAKEN_TRIES):
            try:
                self.move(source, target)
                return target
            except TargetTakenError:
                if attempt == TAKEN_TRIES - 1:
                    raise
                target = self.target(rel, failed=False)
        raise AssertionError("unreachable")  # pragma: no cover

    def prune_listen_studies(self, dirs: Iterable[str]) -> None:
        """Remove the study folders under ``incoming/.listen/<AE>/`` among ``dirs`` that are
        empty now (their files finished). Folders still in use are left (rmdir refuses them);
        the listener makes a study folder again if one is removed under it
        (:func:`forwarder.net.placement.place`). AE folders stay: the listener keeps them."""
        staging = os.path.join(self.incoming, LISTEN_FOLDER)
        for d in set(dirs):
            if os.path.dirname(os.path.dirname(d)) == staging:
                with contextlib.suppress(OSError):
                    os.rmdir(d)

    def sync_dirs(self, dirs: Iterable[StrPath]) -> None:
        for d in set(dirs):
            fsync_dir(d)


def _copy_across(source: Path, target: Path, *, sync: bool) -> None:
    """The first half of a move across filesystems: a copy into a dot-file beside ``target``,
    fsynced, renamed into place (never over a file there: FileExistsError)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.moving")
    try:
        shutil.copyfile(source, tmp)
        # As a rename keeps them: the queue knows a file by its size and mtime
        # (`forwarder retry` moves one back from failed/, as queued).
        with contextlib.suppress(OSError):
            shutil.copystat(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        rename_noreplace(tmp, target)
    except OSError:
        # A partial copy would keep the far filesystem full for every later move.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync:
        fsync_dir(target.parent)


def _moved_already(source: StrPath, target: StrPath) -> bool:
    """Whether ``target`` holds ``source`` already: the same file (a link-and-unlink move
    killed between the two) or the same bytes (a copy across filesystems whose source could
    not be removed). Removing the source then loses nothing."""
    if same_file(source, target):
        return True
    try:
        # A symlink there is not the file, whatever it points to.
        regular = stat.S_ISREG(os.lstat(target).st_mode)
        return regular and filecmp.cmp(source, target, shallow=False)
    except OSError:
        return False


def _probe_write(folder: Path) -> None:
    """Create a file in ``folder`` and drop it, raising OSError when that is refused. An
    unnamed file (O_TMPFILE) where the filesystem has them, so that nothing ever appears in
    done/ or failed/ (scripts watch those); else a dot-file, removed at once."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            os.close(os.open(folder, tmpfile | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    probe = folder / f".forwarder-write-test.{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass  # a probe left by a killed run with our PID: writable enough
    with contextlib.suppress(OSError):
        probe.unlink()


_ROLES = {
    "incoming": "the folder it takes files from",
    "done": "it moves delivered files there",
    "failed": "it moves files it could not deliver there",
}


def _not_writable(role: str, folder: Path, exc: OSError, what: str) -> str:
    return (
        f"the {role} folder {folder} is not writable ({what}: {exc.strerror or exc}); "
        f"forwarder needs it ({_ROLES[role]}). Make it writable by the forwarder user; under the "
        f"packaged systemd unit, a folder outside ReadWritePaths= is read-only: add it with "
        f"`systemctl edit forwarder` ([Service] ReadWritePaths={folder})"
    )


def numbered(name: str, n: int | str) -> str:
    """``a.dcm`` -> ``a.1.dcm``; a name whose last dotted part is a number (files named by
    their SOP Instance UID: ``1.2.840.113619.2.55``) gets ``.1`` appended, so the result does
    not read as another UID."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or ext.isdigit():
        return f"{name}.{n}"
    return f"{stem}.{n}.{ext}"


#: What the report beside a file in failed/ adds to its name.
ERROR_SUFFIX = ".error.json"


def _error_path(target: Path) -> Path:
    return target.with_name(target.name + ERROR_SUFFIX)
