"""Daemon logging: the journal decision, fields(), and the plain-text format.

There is no journald on the test machine (systemd is not PID 1), so the journal test gives a
child process a private /run with a datagram socket at /run/systemd/journal/socket, where
libsystemd sends, and reads back the fields of the entry.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FORWARDER

from forwarder import logsetup
from forwarder.logsetup import configure_daemon_logging, fields, stderr_is_journal


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    pynetdicom_level = logging.getLogger("pynetdicom").level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)


def test_fields_omits_none_and_formats_status() -> None:
    assert fields() == {}
    assert fields(
        destination="pacs",
        sop_instance_uid="1.2.840.1",
        status=0xA700,
        file="/spool/incoming/a.dcm",
        outcome="retry",
    ) == {
        "DESTINATION": "pacs",
        "SOP_INSTANCE_UID": "1.2.840.1",
        "DIMSE_STATUS": "0xA700",
        "FILE": "/spool/incoming/a.dcm",
        "OUTCOME": "retry",
    }
    assert fields(status=0) == {"DIMSE_STATUS": "0x0000"}
    assert fields(status=0xB000, outcome="warning") == {
        "DIMSE_STATUS": "0xB000",
        "OUTCOME": "warning",
    }


def test_journal_decision(tmp_path: Path) -> None:
    target = tmp_path / "stream"
    target.write_text("")
    st = os.stat(target)
    assert stderr_is_journal(f"{st.st_dev}:{st.st_ino}", st)
    assert not stderr_is_journal(f"{st.st_dev}:{st.st_ino + 1}", st)
    assert not stderr_is_journal(f"{st.st_dev + 1}:{st.st_ino}", st)
    assert not stderr_is_journal(None, st)
    assert not stderr_is_journal("", st)
    assert not stderr_is_journal("garbage", st)
    assert not stderr_is_journal("1:x", st)
    assert not stderr_is_journal(f"{st.st_dev}:{st.st_ino}", None)


_CHILD = """
import logging, sys
from forwarder.logsetup import configure_daemon_logging, fields
configure_daemon_logging(sys.argv[1], log_phi=sys.argv[2] == "phi")
kinds = [type(h).__name__ for h in logging.getLogger().handlers]
print(",".join(kinds), flush=True)
log = logging.getLogger("forwarder.daemon.worker")
log.info("stored %s on %s", "1.2.3", "pacs", extra=fields(destination="pacs", outcome="stored"))
log.debug("hidden at INFO")
logging.getLogger("pynetdicom.assoc").info("pdu chatter")
"""


def _run_child(tmp_path: Path, level: str, phi: str, env: dict[str, str]) -> tuple[str, str]:
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, level, phi],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
            timeout=60,
            check=True,
        )
    return proc.stdout.strip(), err_path.read_text()


def test_plain_lines_when_stderr_is_a_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    handlers, err = _run_child(tmp_path, "INFO", "", env)
    assert handlers == "StreamHandler"
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO "
        r"forwarder\.daemon\.worker: stored 1\.2\.3 on pacs",
        lines[0],
    )


def test_journal_stream_of_another_file_keeps_plain_text(tmp_path: Path) -> None:
    # A child of a systemd service inherits JOURNAL_STREAM but its stderr goes elsewhere.
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    handlers, err = _run_child(tmp_path, "INFO", "", env)
    assert handlers == "StreamHandler"
    assert "stored 1.2.3 on pacs" in err


_JOURNAL_CHILD = """
import logging, os, socket, sys
# Stand in for journald: this process has a private /run (tmpfs), so the path is ours.
os.makedirs("/run/systemd/journal")
journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
journald.bind("/run/systemd/journal/socket")
journald.settimeout(10)
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
from forwarder.logsetup import configure_daemon_logging, fields
configure_daemon_logging("INFO")
print(type(logging.getLogger().handlers[-1]).__name__)
logging.getLogger("forwarder.daemon.worker").warning(
    "cannot store %s", "1.2.3",
    extra=fields(destination="pacs", sop_instance_uid="1.2.3", status=0xA700, outcome="failed"),
)
sys.stdout.write(journald.recv(65536).decode())
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("forwarder.daemon.worker").exception("a bug")
# Multi-line values go as NAME, newline, a 64-bit length, the value: not all UTF-8.
sys.stdout.write("\\n--next--\\n" + journald.recv(65536).decode(errors="replace"))
"""


def test_journal_fields_reach_journald(tmp_path: Path) -> None:
    pytest.importorskip("systemd.journal", reason="systemd-python not installed")
    unshare = "/usr/bin/unshare"
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace: {probe.stderr.decode().strip()}")
    script = tmp_path / "child.py"
    script.write_text(_JOURNAL_CHILD)
    with (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.run(
            [
                unshare,
                "-m",
                "sh",
                "-c",
                'mount -t tmpfs tmpfs /run && exec "$0" "$1"',
                sys.executable,
                str(script),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
    handler, _, datagrams = proc.stdout.partition("\n")
    datagram, _, failure = datagrams.partition("\n--next--\n")
    assert handler == "FieldsJournalHandler"
    entry = dict(line.split("=", 1) for line in datagram.splitlines() if "=" in line)
    assert entry["MESSAGE"] == "cannot store 1.2.3"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "forwarder"
    assert entry["LOGGER"] == "forwarder.daemon.worker"
    assert entry["DESTINATION"] == "pacs"
    assert entry["SOP_INSTANCE_UID"] == "1.2.3"
    assert entry["DIMSE_STATUS"] == "0xA700"
    assert entry["OUTCOME"] == "failed"
    assert "FILE" not in entry
    assert entry["CODE_FUNC"] == "<module>" and entry["CODE_LINE"] == "13"
    assert entry["THREAD_NAME"] == "MainThread"
    # Only journal-valid names: not the record's other (lower-case) attributes.
    assert all(key.isupper() for key in entry)
    # An exception: its traceback in MESSAGE (journalctl shows it) and EXCEPTION_TEXT.
    assert "a bug\nTraceback (most recent call last):" in failure
    assert "\nEXCEPTION_TEXT\n" in failure
    assert "ZeroDivisionError: division by zero" in failure
    assert "PRIORITY=3" in failure
    assert (tmp_path / "stderr.txt").read_text() == ""


def test_debug_level_and_phi_warning_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    _, err = _run_child(tmp_path, "DEBUG", "phi", env)
    assert err.count("log_phi is on") == 1
    assert "hidden at INFO" in err
    assert "pdu chatter" in err


def test_pynetdicom_quieter_at_info(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    _, err = _run_child(tmp_path, "INFO", "", env)
    assert "pdu chatter" not in err
    assert "log_phi" not in err


def test_reconfigure_replaces_own_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    before = len(root.handlers)
    configure_daemon_logging("INFO")
    configure_daemon_logging("WARNING")
    assert len(root.handlers) == before + 1
    assert root.level == logging.WARNING


def test_phi_warning_only_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setattr(logsetup, "_phi_warned", False)
    configure_daemon_logging("INFO", log_phi=True)
    configure_daemon_logging("INFO", log_phi=True)
    assert sum("log_phi is on" in r.getMessage() for r in caplog.records) == 1


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_daemon_logging("LOUD")


def test_journal_stream_without_systemd_python_carries_priorities(tmp_path: Path) -> None:
    """Under systemd without systemd-python, records still reach the journal with their
    priority (a ``<N>`` prefix journald parses), so ``journalctl -p err`` finds errors."""
    err_path = tmp_path / "stderr.txt"
    code = (
        "import sys; sys.modules['systemd'] = None\n"
        "import logging, os\n"
        "st = os.fstat(2)\n"
        "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from forwarder.logsetup import configure_daemon_logging\n"
        "configure_daemon_logging('INFO')\n"
        "log = logging.getLogger('forwarder.daemon.worker')\n"
        "log.info('stored %s', '1.2.3')\n"
        "log.warning('retrying %s', '1.2.4')\n"
        "try:\n"
        "    raise ValueError('boom')\n"
        "except ValueError:\n"
        "    log.exception('crashed on %s', '1.2.5')\n"
    )
    with err_path.open("w") as err:
        subprocess.run(
            [sys.executable, "-c", code], stderr=err, env=dict(os.environ), timeout=60, check=True
        )
    lines = err_path.read_text().splitlines()
    assert lines[0] == "<6>forwarder.daemon.worker: stored 1.2.3"
    assert lines[1] == "<4>forwarder.daemon.worker: retrying 1.2.4"
    assert lines[2] == "<3>forwarder.daemon.worker: crashed on 1.2.5"
    # Each traceback line is its own journal entry, at the record's priority.
    assert len(lines) > 4
    assert all(line.startswith("<3>") for line in lines[2:])
    assert lines[-1] == "<3>ValueError: boom"


def _run_with_bad_config(tmp_path: Path, journal: bool) -> tuple[int, list[str]]:
    config = tmp_path / "bad.yaml"
    config.write_text("incoming: /tmp/x\nsurprise: 1\n")
    err_path = tmp_path / "stderr.txt"
    err_path.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "FORWARDER_CONFIG")}
    if journal:
        st = os.stat(err_path)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    with err_path.open("a") as err:
        proc = subprocess.run(
            [FORWARDER, "run", "-c", str(config)],
            stderr=err,
            stdout=subprocess.DEVNULL,
            env=env,
            timeout=60,
            check=False,
        )
    return proc.returncode, err_path.read_text().splitlines()


def test_config_errors_at_start_reach_the_journal_as_errors(tmp_path: Path) -> None:
    code, lines = _run_with_bad_config(tmp_path, journal=True)
    assert code == 78
    assert lines and all(line.startswith("<3>") for line in lines), lines
    assert any("surprise (line 2): unknown key" in line for line in lines)
    assert lines[-1].startswith("<3>forwarder run: invalid config file")


def test_config_errors_on_a_terminal_have_no_prefix(tmp_path: Path) -> None:
    code, lines = _run_with_bad_config(tmp_path, journal=False)
    assert code == 78
    assert lines and not any(line.startswith("<") for line in lines), lines
