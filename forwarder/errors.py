"""The exception tree. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class ForwarderError(Exception):
    """Base class for every error forwarder raises on purpose."""


class ConfigError(ForwarderError):
    """The configuration file is invalid. ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class InvalidFileError(ForwarderError):
    """A file is not usable DICOM (not Part 10, truncated, empty, missing UIDs...)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class UnreadableFileError(InvalidFileError):
    """The file could not be read at all (permissions, I/O error): nothing is known about its
    content, so it is not judged; the daemon leaves it in place and tries again later."""


class AssociationError(ForwarderError):
    """The peer could not be reached, or refused or broke the association.

    ``retryable`` is True for transient conditions (refused connection, timeout, transient
    rejection, abort) and False for permanent ones (permanent rejection, bad AE title).
    ``not_before`` is the monotonic time before which the peer asked not to be tried again
    (HTTP ``Retry-After``; 0.0: it did not say).
    """

    def __init__(self, message: str, *, retryable: bool, not_before: float = 0.0) -> None:
        self.retryable = retryable
        self.not_before = not_before
        super().__init__(message)


class ProtocolError(AssociationError):
    """The peer broke PS3.7/PS3.8: a malformed or unexpected PDU, item or command set, or a
    response that does not answer our request. The association is aborted and the file is
    tried again later (retryable), since the file itself is not at fault."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class ConnectInterrupted(AssociationError):
    """A TCP connect under way was interrupted because forwarder is stopping: nothing was sent
    and nothing is known about the peer, so no attempt is charged and the destination's state
    does not change (retryable: the file is sent after the restart)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class SendError(ForwarderError):
    """One object could not be stored. ``status`` is the DIMSE status when the peer gave one."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        self.retryable = retryable
        self.status = status
        super().__init__(message)


class TLSSetupError(ForwarderError):
    """TLS material is missing, unreadable or unsafe (for example a world-readable key)."""


class SetupError(ForwarderError):
    """The host is not set up for the daemon (a spool folder it cannot write, for example):
    restarting will not help, so ``forwarder run`` exits 78 like for an invalid config. The
    message names the path, what was tried and the fix."""


class QueueError(ForwarderError):
    """The queue database failed (disk full, permissions, corruption). Says what was being done."""


class QueueSchemaError(QueueError):
    """The queue database is at another schema version than this forwarder's, and is not
    upgraded here (``found``, ``wanted``: the versions): an older one read as it is by
    ``forwarder status`` and ``find`` beside a daemon that may run older code, or one a
    command would have to upgrade under a running daemon."""

    def __init__(self, message: str, *, found: int, wanted: int) -> None:
        super().__init__(message)
        self.found = found
        self.wanted = wanted


class PathQueuedError(QueueError):
    """A file cannot be queued under a path that another unfinished file of the queue holds
    (``forwarder retry``: a file dropped again under that name, not finished yet)."""
