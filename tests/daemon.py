"""``forwarder run`` as a real subprocess, for daemon and fault-injection tests.

A :class:`Daemon` owns one folder tree under ``tmp_path`` (``incoming/``, ``done/``,
``failed/``, ``queue.sqlite``, ``forwarder.yaml``, ``forwarder.log``), writes the config,
starts the daemon, waits for conditions with deadlines, and stops it by PID::

    from daemon import Daemon, destination
    from peers import ScriptedSCP

    with ScriptedSCP() as scp, Daemon(tmp_path, destinations=[destination("a", scp.port)]) as d:
        d.drop_files(5)                 # atomically (written under .tmp, then renamed)
        d.wait_done(5)                  # 5 files in done/
        assert d.stop() == 0            # SIGTERM; the exit code
        d.assert_no_phi()               # no PATIENT_NAME / PATIENT_ID in the log

The log is one file for every run of the daemon (appended on restart), so a test can read what
happened across a crash. :meth:`Daemon.start` waits for the "forwarder running" line, which the
service logs once its queue is recovered, its workers started and its first scan is under way.

Timings default to short ones (settle 200ms, retry 200ms..1s) so tests stay fast. Everything
is overridable: ``Daemon(tmp_path, destinations=[...], routes=[...], retry={...},
watch={...}, extra={...top-level keys...}, env={"FORWARDER_CRASH_AT": "mid-store"})``.

Only the test that made a :class:`Daemon` stops it; ``__exit__`` (and :meth:`close`) SIGKILL a
daemon still running after a SIGTERM grace period, so no process outlives its test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from conftest import FORWARDER, wait_until
from dicomgen import PATIENT_ID, PATIENT_NAME, write_file
from pydicom.dataset import Dataset

READY_LINE = "forwarder running"
RELOAD_APPLIED = "reload: applied"
RELOAD_REJECTED = "reload: config invalid"

#: Short timings every daemon test starts from (see the module docstring).
DEFAULT_RETRY: dict[str, Any] = {"initial_delay": "200ms", "max_delay": "1s"}
DEFAULT_WATCH: dict[str, Any] = {"settle": "200ms", "rescan_interval": "2s"}


class DaemonError(AssertionError):
    """The daemon did not do what the test waited for; the message carries the log's tail."""


def destination(
    name: str,
    port: int,
    *,
    ae_title: str = "SCP",
    host: str = "127.0.0.1",
    associations: int = 1,
    **extra: Any,
) -> dict[str, Any]:
    """A ``destinations:`` entry with short timeouts (connect 2s, response 10s, idle 5s).

    ``extra`` adds or overrides keys (``tls={...}``, ``response_timeout="1s"``, ...)."""
    entry: dict[str, Any] = {
        "name": name,
        "ae_title": ae_title,
        "host": host,
        "port": port,
        "associations": associations,
        "connect_timeout": "2s",
        "response_timeout": "10s",
        "release_timeout": "2s",
        "idle_timeout": "5s",
    }
    entry.update(extra)
    return entry


def route(name: str, to: Sequence[str], **match: str | list[str]) -> dict[str, Any]:
    """A ``routes:`` entry: ``route("ct", ["pacs"], Modality="CT", folder="ct/*")``."""
    return {"name": name, "match": dict(match), "to": list(to)}


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for forwarder subprocesses: nothing inherited that changes behaviour
    (no FORWARDER_CONFIG, no crash hook, no systemd sockets), unbuffered output, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FORWARDER_", "NOTIFY_", "WATCHDOG_", "JOURNAL_", "LISTEN_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path`` under an ignored name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


@dataclass(frozen=True, slots=True)
class Dropped:
    """A generated file put into incoming: where (relative) and its SOP Instance UID."""

    rel_path: str
    sop_instance_uid: str
    modality: str


class Daemon:
    """One ``forwarder run -c CONFIG`` subprocess and its folders (see the module docstring).

    Attributes: ``root`` (= tmp_path), ``incoming``, ``done``, ``failed``, ``queue``,
    ``config_path``, ``log_path``, ``proc`` (the current :class:`subprocess.Popen`, or None),
    ``config`` (the dict last written as YAML).
    """

    def __init__(
        self,
        root: Path,
        *,
        destinations: Sequence[Mapping[str, Any]],
        routes: Sequence[Mapping[str, Any]] | None = None,
        retry: Mapping[str, Any] | None = None,
        watch: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "INFO",
        wrapper: Sequence[str] = (),
    ) -> None:
        self.root = root
        # argv run before `forwarder run ...`, which it must exec (the PID stays the daemon's)
        self.wrapper = list(wrapper)
        self.incoming = root / "incoming"
        self.done = root / "done"
        self.failed = root / "failed"
        self.queue = root / "queue.sqlite"
        self.config_path = root / "forwarder.yaml"
        self.log_path = root / "forwarder.log"
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []  # of every run that ended, in order
        self._log_start = 0  # log offset where the current run began
        for folder in (self.incoming, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self.config: dict[str, Any] = {}
        self.write_config(
            destinations=destinations,
            routes=routes,
            retry=retry,
            watch=watch,
            extra=extra,
            log_level=log_level,
        )

    # -- config -----------------------------------------------------------------------------

    def write_config(
        self,
        *,
        destinations: Sequence[Mapping[str, Any]] | None = None,
        routes: Sequence[Mapping[str, Any]] | None = None,
        retry: Mapping[str, Any] | None = None,
        watch: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        log_level: str | None = None,
    ) -> dict[str, Any]:
        """(Re)write the config file. The first call sets everything; later calls change only
        what they pass (``routes=[]`` is kept as an empty list; drop routes with
        ``write_raw``). Returns the config dict."""
        c = self.config
        if not c:
            c.update(
                {
                    "ae_title": "FORWARDER",
                    "incoming": str(self.incoming),
                    "done": str(self.done),
                    "failed": str(self.failed),
                    "queue": str(self.queue),
                    "destinations": [],
                    "retry": dict(DEFAULT_RETRY),
                    "watch": dict(DEFAULT_WATCH),
                    "log_level": "INFO",
                }
            )
        if destinations is not None:
            c["destinations"] = [dict(d) for d in destinations]
        if routes is not None:
            c["routes"] = [dict(r) for r in routes]
        if retry is not None:
            c["retry"] = {**DEFAULT_RETRY, **retry}
        if watch is not None:
            c["watch"] = {**DEFAULT_WATCH, **watch}
        if log_level is not None:
            c["log_level"] = log_level
        if extra:
            c.update(extra)
        self.write_raw(yaml.safe_dump(c, sort_keys=False))
        return c

    def write_raw(self, text: str) -> None:
        """Replace the config file with ``text`` (an invalid config for a reload test...)."""
        tmp = self.config_path.with_name(f".{self.config_path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.rename(tmp, self.config_path)

    # -- process ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DaemonError("the daemon is not started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> Daemon:
        """Start ``forwarder run -c CONFIG``; by default wait for its "running" line."""
        if self.running():
            raise DaemonError(f"already running as pid {self.pid}")
        self._reap()
        with open(self.log_path, "ab") as log:
            log.write(f"===== test: starting forwarder run ({time.strftime('%T')})\n".encode())
            log.flush()
            self._log_start = log.tell()
            self.proc = subprocess.Popen(
                [*self.wrapper, FORWARDER, "run", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=subprocess_env(self.env),
                cwd=self.root,
            )
        if wait_ready:
            self.wait_log(READY_LINE, timeout=timeout, what="the daemon to be ready")
        return self

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the daemon's PID."""
        if not self.running():
            raise DaemonError(f"cannot send signal {signum}: the daemon is not running")
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for the exit and return its code. If it does not exit within
        ``timeout``, SIGKILL it and raise :class:`DaemonError` (a shutdown that hangs is a bug)."""
        if self.proc is None:
            raise DaemonError("the daemon was never started")
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise DaemonError(
                    f"no exit {timeout}s after SIGTERM; killed it\n{self.log_tail()}"
                ) from None
        return self._reap()

    def kill(self) -> int:
        """SIGKILL (a crash); returns the exit code (-9)."""
        if self.proc is None:
            raise DaemonError("the daemon was never started")
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        return self._reap()

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the daemon to exit by itself (a crash point, a bad config); its code."""
        if self.proc is None:
            raise DaemonError("the daemon was never started")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(f"still running after {timeout}s\n{self.log_tail()}") from None
        return self._reap()

    def _reap(self) -> int:
        if self.proc is None:
            return 0
        code = self.proc.wait()
        self.exit_codes.append(code)
        self.proc = None
        return code

    def reload(self, *, expect_applied: bool = True, timeout: float = 15.0) -> None:
        """SIGHUP, then wait for the daemon to log that it applied (or rejected) the config."""
        marker = RELOAD_APPLIED if expect_applied else RELOAD_REJECTED
        before = self.log_text(current_run=True).count(marker)
        self.signal(signal.SIGHUP)
        wait_until(
            lambda: self.log_text(current_run=True).count(marker) > before or not self.running(),
            timeout,
            what=f"{marker!r} after SIGHUP",
        )
        if not self.running():
            raise DaemonError(f"the daemon exited on SIGHUP\n{self.log_tail()}")

    def close(self) -> None:
        """Stop the daemon whatever its state (SIGTERM, then SIGKILL); never raises."""
        if self.proc is None:
            return
        try:
            self.stop(timeout=10.0)
        except DaemonError:
            pass

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the log ----------------------------------------------------------------------------

    def log_text(self, *, current_run: bool = False) -> str:
        """The whole log (every run), or only the current/latest run's part."""
        if not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()
        if current_run:
            data = data[self._log_start :]
        return data.decode("utf-8", "replace")

    def log_tail(self, lines: int = 40) -> str:
        return "--- forwarder log (tail) ---\n" + "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(
        self,
        pattern: str,
        *,
        timeout: float = 15.0,
        count: int = 1,
        regex: bool = False,
        what: str = "",
    ) -> None:
        """Wait until the current run's log holds ``pattern`` ``count`` times. Fails at once
        (with the log's tail) if the daemon exits meanwhile."""

        def seen() -> bool:
            text = self.log_text(current_run=True)
            n = len(re.findall(pattern, text)) if regex else text.count(pattern)
            if n >= count:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise DaemonError(
                    f"the daemon exited ({self.proc.returncode}) while waiting for "
                    f"{what or pattern!r}\n{self.log_tail()}"
                )
            return False

        self._wait(seen, timeout, what or repr(pattern))

    def assert_no_phi(self) -> None:
        """The log never names the generated patient (dicomgen's PATIENT_NAME / PATIENT_ID)."""
        text = self.log_text()
        for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.split("^")[0]):
            assert secret not in text, f"the log contains patient data {secret!r}"

    # -- files ------------------------------------------------------------------------------

    def drop(self, rel_path: str, **kwargs: Any) -> Dropped:
        """Generate a DICOM file (``dicomgen.make_dataset`` kwargs: modality, rows, ...) and
        put it at ``incoming/rel_path`` atomically."""
        staging = self.root / "staging" / f"{uuid.uuid4().hex}.dcm"
        ds: Dataset = write_file(staging, **kwargs)
        target = self.incoming / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        os.rename(staging, tmp)
        os.rename(tmp, target)
        return Dropped(rel_path, str(ds.SOPInstanceUID), str(ds.Modality))

    def drop_files(
        self, count: int, *, prefix: str = "img", folder: str = "", **kwargs: Any
    ) -> list[Dropped]:
        """``count`` generated files ``folder/prefix0000.dcm``... dropped atomically."""
        sub = f"{folder.strip('/')}/" if folder else ""
        return [self.drop(f"{sub}{prefix}{i:04d}.dcm", seed=i, **kwargs) for i in range(count)]

    def drop_bytes(self, rel_path: str, data: bytes) -> Path:
        """Put arbitrary bytes (garbage, a truncated file) at ``incoming/rel_path`` atomically."""
        target = self.incoming / rel_path
        write_atomic(target, data)
        return target

    @staticmethod
    def _files(folder: Path, *, errors: bool = False) -> list[str]:
        """Relative paths of the files under ``folder`` (``.error.json`` only if ``errors``)."""
        if not folder.exists():
            return []
        out = []
        for p in folder.rglob("*"):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.name.endswith(".error.json") != errors:
                continue
            out.append(p.relative_to(folder).as_posix())
        return sorted(out)

    @staticmethod
    def _count(folder: Path) -> int:
        """``len(_files(folder))``, without building, sorting and stat-ing a path for each: a
        wait polls it, and over 10,000 files that cost a core the daemon needed (0.3 s a look,
        against 10 ms here)."""
        found = 0
        pending = [os.fspath(folder)] if folder.exists() else []
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):  # as rglob: no symlinked folder
                        pending.append(entry.path)
                    elif (
                        entry.is_file()
                        and not entry.name.startswith(".")
                        and not entry.name.endswith(".error.json")
                    ):
                        found += 1
        return found

    def done_files(self) -> list[str]:
        """Relative paths in ``done/``."""
        return self._files(self.done)

    def done_count(self) -> int:
        """How many files ``done/`` holds (``len(done_files())``, cheaply)."""
        return self._count(self.done)

    def failed_files(self) -> list[str]:
        """Relative paths in ``failed/`` (without the ``.error.json`` files)."""
        return self._files(self.failed)

    def incoming_files(self) -> list[str]:
        """Relative paths still in ``incoming/`` (hidden and temporary names included)."""
        return [
            p.relative_to(self.incoming).as_posix()
            for p in sorted(self.incoming.rglob("*"))
            if p.is_file()
        ]

    def error_json(self, rel_path: str) -> dict[str, Any]:
        """The parsed ``failed/REL_PATH.error.json``."""
        path = self.failed / f"{rel_path}.error.json"
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return doc

    def _wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"timed out after {timeout}s waiting for {what}\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonError(f"the daemon exited ({self.proc.returncode})\n{self.log_tail()}")

    def wait_done(self, n: int, timeout: float = 30.0) -> list[str]:
        """Wait until ``done/`` holds at least ``n`` files; returns their relative paths."""

        def cond() -> bool:
            self._check_alive()
            return self.done_count() >= n

        self._wait(cond, timeout, f"{n} files in done/ (have {self.done_count()})")
        return self.done_files()

    def wait_failed(self, n: int, timeout: float = 30.0) -> list[str]:
        """Wait until ``failed/`` holds at least ``n`` files, each with its ``.error.json``."""

        def cond() -> bool:
            self._check_alive()
            files = self.failed_files()
            return len(files) >= n and all(
                (self.failed / f"{f}.error.json").exists() for f in files
            )

        self._wait(cond, timeout, f"{n} files in failed/ (have {len(self.failed_files())})")
        return self.failed_files()

    def wait_incoming_empty(self, timeout: float = 30.0) -> None:
        """Wait until every file left incoming (hidden/temporary names count too)."""

        def cond() -> bool:
            self._check_alive()
            return not self.incoming_files()

        self._wait(cond, timeout, "incoming/ to empty")

    # -- the admin commands -----------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``forwarder COMMAND -c CONFIG ARGS...`` (``args[0]`` is the command)."""
        command, *rest = args
        return subprocess.run(
            [FORWARDER, command, "-c", str(self.config_path), *rest],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=timeout,
            check=False,
        )

    def status_json(self) -> dict[str, Any]:
        """``forwarder status --json``, parsed; fails the test on a non-zero exit."""
        result = self.cli("status", "--json")
        if result.returncode != 0:
            raise DaemonError(f"status exited {result.returncode}: {result.stderr}")
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0, what: str = ""
    ) -> dict[str, Any]:
        """Poll ``status --json`` until ``predicate(doc["destinations"])`` holds; the doc."""
        last: dict[str, Any] = {}

        def cond() -> bool:
            nonlocal last
            last = self.status_json()
            return predicate(last["destinations"])

        self._wait(cond, timeout, what or "a queue status")
        return last


def uids(dropped: Iterable[Dropped]) -> set[str]:
    """The SOP Instance UIDs of dropped files."""
    return {d.sop_instance_uid for d in dropped}
