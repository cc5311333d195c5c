"""Daemon logging: structured journald fields under systemd, plain text lines otherwise.

When stderr *is* the journal (systemd sets ``JOURNAL_STREAM=dev:ino`` for the stream it
connected to stderr), records go to journald through ``systemd.journal.sendv``
(:class:`FieldsJournalHandler`) so the extra fields built by :func:`fields` become journal
fields and
``journalctl -u forwarder DESTINATION=pacs OUTCOME=failed`` works. Anywhere else (a terminal,
a pipe, a file) it is one ``time level logger: message`` line per record on stderr; the fields
are simply not shown. Under systemd without systemd-python the lines go to stderr with a
``<N>`` syslog priority prefix, which journald turns into the entry's priority, so
``journalctl -p err`` still finds errors; :func:`journal_prefix` gives the CLI the same prefix
for what it prints before logging is set up (an invalid config at start).

Only the CLI calls :func:`configure_daemon_logging`; library modules just log.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Final

logger = logging.getLogger(__name__)

PLAIN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_IDENTIFIER: Final = "forwarder"

# The journal field names of fields(); journalctl matches them exactly.
FIELD_DESTINATION: Final = "DESTINATION"
FIELD_SOP_INSTANCE_UID: Final = "SOP_INSTANCE_UID"
FIELD_DIMSE_STATUS: Final = "DIMSE_STATUS"
FIELD_FILE: Final = "FILE"
FIELD_OUTCOME: Final = "OUTCOME"

# Marks the handlers this module installed, so a second call (reload) replaces them.
_OURS: Final = "_forwarder_daemon_handler"
_phi_warned = False


def fields(
    *,
    destination: str | None = None,
    sop_instance_uid: str | None = None,
    status: int | None = None,
    file: str | None = None,
    outcome: str | None = None,
) -> dict[str, str]:
    """The ``extra=`` dict for a log call; None values are left out.

    >>> fields(destination="pacs", status=0xA700)
    {'DESTINATION': 'pacs', 'DIMSE_STATUS': '0xA700'}

    Never put patient names or IDs here: these fields are indexed by journald.
    """
    out: dict[str, str] = {}
    if destination is not None:
        out[FIELD_DESTINATION] = destination
    if sop_instance_uid is not None:
        out[FIELD_SOP_INSTANCE_UID] = sop_instance_uid
    if status is not None:
        out[FIELD_DIMSE_STATUS] = f"0x{status:04X}"
    if file is not None:
        out[FIELD_FILE] = file
    if outcome is not None:
        out[FIELD_OUTCOME] = outcome
    return out


def stderr_is_journal(journal_stream: str | None, stderr_stat: os.stat_result | None) -> bool:
    """True when ``JOURNAL_STREAM`` (``"<st_dev>:<st_ino>"``, decimal) names the file stderr
    is open on. A child whose stderr was redirected inherits the variable but fails this."""
    if not journal_stream or stderr_stat is None:
        return False
    dev, sep, ino = journal_stream.strip().partition(":")
    if not sep:
        return False
    try:
        return int(dev) == stderr_stat.st_dev and int(ino) == stderr_stat.st_ino
    except ValueError:
        return False


def _stderr_stat() -> os.stat_result | None:
    try:
        return os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return None  # stderr closed or replaced by something without a descriptor


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd import journal
    except ImportError:
        return None
    handler: logging.Handler = FieldsJournalHandler(journal.sendv)
    # journald stamps time, priority and unit itself.
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


class FieldsJournalHandler(logging.Handler):
    """A record as one journal entry: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, LOGGER,
    THREAD_NAME, CODE_FILE/LINE/FUNC, EXCEPTION_TEXT, and the record's upper-case attributes
    (the fields of :func:`fields`, ``extra=``).

    ``systemd.journal.JournalHandler`` also sends every other attribute of the record (some
    twenty lower-case names journald then drops): three times the cost a record (~25 against
    ~8 us), paid for each file the daemon stores at INFO.
    """

    def __init__(self, sendv: Callable[..., object]) -> None:
        super().__init__()
        self._sendv = sendv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            args = [
                "MESSAGE=" + self.format(record),
                f"PRIORITY={_priority(record.levelno)}",
                "SYSLOG_IDENTIFIER=" + SYSLOG_IDENTIFIER,
                "LOGGER=" + record.name,
                f"THREAD_NAME={record.threadName}",
                "CODE_FILE=" + record.pathname,
                f"CODE_LINE={record.lineno}",
                "CODE_FUNC=" + record.funcName,
            ]
            if record.exc_text:
                args.append("EXCEPTION_TEXT=" + record.exc_text)
            for key, value in record.__dict__.items():
                if key.isupper():
                    args.append(f"{key}={value}")
            self._sendv(*args)
        except Exception:
            self.handleError(record)


def _plain_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    return handler


# syslog priorities (sd-daemon(3)) of the logging levels.
_PRIORITIES: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def _priority(levelno: int) -> int:
    return next((prio for level, prio in _PRIORITIES if levelno >= level), 7)


class _JournalStreamFormatter(logging.Formatter):
    """``<N>logger: message`` for a stderr that is the journal: journald reads ``<N>`` as the
    priority (SyslogLevelPrefix=yes, systemd's default) and stamps the time itself."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_priority(record.levelno)}>"
        # A traceback spans lines; each line is its own journal entry and needs the prefix.
        return "\n".join(prefix + line for line in text.splitlines())


def _journal_stream_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalStreamFormatter())
    return handler


def journal_prefix(levelno: int = logging.ERROR) -> str:
    """``"<N>"`` (the syslog priority of ``levelno``) when stderr is the journal, else ``""``:
    for lines the CLI prints itself, so that ``journalctl -p err`` shows why the service
    exited (journald files unprefixed stderr lines at info)."""
    if stderr_is_journal(os.environ.get("JOURNAL_STREAM"), _stderr_stat()):
        return f"<{_priority(levelno)}>"
    return ""


def configure_daemon_logging(level: str = "INFO", *, log_phi: bool = False) -> None:
    """Send the root logger to the journal when stderr is the journal, else plain lines to
    stderr. Safe to call again (on reload): it replaces the handler it installed before.

    ``log_phi`` (config ``log_phi``) only makes this warn, once per process, that logs may
    now contain patient data; the modules that format headers decide what to log.
    """
    global _phi_warned
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")

    handler: logging.Handler
    if stderr_is_journal(os.environ.get("JOURNAL_STREAM"), _stderr_stat()):
        handler = _journal_handler() or _journal_stream_handler()
    else:
        handler = _plain_handler()
    setattr(handler, _OURS, True)

    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OURS, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    # pynetdicom logs every PDU at INFO/DEBUG; keep it at WARNING unless we debug.
    quieter = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(quieter)

    if log_phi and not _phi_warned:
        _phi_warned = True
        logger.warning(
            "log_phi is on: logs may contain patient names and IDs; "
            "turn it off (log_phi: false) when you are done debugging"
        )
