"""The daemon's supervision of a process it starts: the listener's receiving process
(:mod:`forwarder.daemon.listen_process`) and the watch-and-ingest process
(:mod:`forwarder.daemon.ingest_process`).

:class:`ChildProcess` starts ``python -m MODULE FD... DAEMON_PID`` with a socket pair to it
(:mod:`forwarder.daemon.listen_wire`), sends it ``init``, and waits for ``ready`` (or
``failed`` with the reason, then its exit). One thread (the supervisor) reads its messages; when
the process dies the death is logged at ERROR, ``healthy`` is False meanwhile (the service stops
feeding systemd's watchdog) and it is started again after a backoff. What each child does and
says is its subclass's.

A child that stops reading or talking does not take the daemon with it:

- every message to it is sent with a deadline (:attr:`ChildProcess.send_timeout`; ``start_timeout``
  until it said ready: a slow start is not a stuck child): a child that does not read (stopped
  with SIGSTOP, stuck on a hung mount) is killed and started again, instead of blocking the
  daemon's thread that sent (the finisher, a reload, the stop);
- it says its health every second (:data:`HEALTH_EVERY`): silent for ``silent_after`` seconds
  it counts as unhealthy, for ``kill_after`` it is killed and started again; a restarted
  child that has not said ready within ``start_timeout`` is killed and started again;
- a child silent for :data:`LOCKED_SILENCE` seconds while the daemon has waited as long for
  the queue's write lock (:attr:`ChildProcess.queue_locked`) is killed then, not after
  ``kill_after``: it was most likely stopped inside one of its queue transactions, and every
  claim, ack and enqueue of the daemon waits behind it (its transaction is rolled back by its
  death, nothing is lost). A child that talks is never killed for a held lock;
- :meth:`ChildProcess.start` gives up when ``cancelled()`` turns true (a SIGTERM during the
  daemon's start-up), rather than waiting out the start timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from forwarder.daemon.listen_wire import Peer, PeerGone, PeerStuck, child_env
from forwarder.errors import ForwarderError

logger = logging.getLogger(__name__)

HEALTH_EVERY = 1.0  # seconds between a child's health messages (its heartbeat)
_STOP_GRACE = 10.0  # seconds for it to exit after being told to, before it is killed
_STEADY = 60.0  # seconds up after which a death counts as the first again
_RETRY_SPAWN = 5.0  # seconds between attempts when the process cannot even be started
LOCKED_SILENCE = 3.0  # seconds silent, the queue locked as long, before a child is killed


class ChildProcess:
    """One supervised child process; subclasses say what it is (:attr:`module`, :attr:`area`,
    :attr:`what`), what it is given (:meth:`_descriptors`, :meth:`_init`) and what its
    messages mean (:meth:`_dispatch`)."""

    module = ""  # python -m MODULE
    area = ""  # the log lines' prefix ("watch", "listen")
    what = ""  # "the receiving process"
    restart_delays: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)  # 1st, 2nd... death in a row
    start_timeout = 60.0  # seconds for a child to import, set up and say ready
    send_timeout = 5.0  # seconds a message to a ready child may wait for room in the socket
    silent_after = 10.0  # seconds without a word after which it counts as unhealthy
    kill_after = 30.0  # seconds without a word after which it is killed and started again

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._peer: Peer | None = None
        self._ready = threading.Event()  # the first process is up, or failed to start
        self._ever_up = False  # a process said ready (so a death after is restarted)
        self._up = False  # the running process said ready
        self._failed: str | None = None  # why the last process failed to start
        self._healthy = False
        self._heard = time.monotonic()  # when the running process last said anything
        self._spawned_at = time.monotonic()  # when the running process was started
        self._spawning: Peer | None = None  # the peer being given its init
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the peer, and what subclasses send along with it
        self._life = threading.Lock()  # a spawn and stop()'s look at what runs, one at a time
        # Seconds the daemon's queue connection has been waiting for another process's write
        # lock (:meth:`forwarder.queue.store.Store.lock_waited`); None: not watched.
        self.queue_locked: Callable[[], float] | None = None

    # -- what subclasses say ------------------------------------------------------------------

    def _descriptors(self) -> tuple[list[int], list[socket.socket]]:
        """Descriptors passed to the process after the peer's, and the sockets to close here
        once it started (or failed to)."""
        return [], []

    def _spawned(self) -> None:
        """Called after each spawn (the receiving process's channels thread)."""

    def _init(self, peer: Peer) -> None:
        """Send ``init`` (and set what goes with it); called under ``_lock`` before the peer
        is made current, so that nothing sent meanwhile goes to no one."""
        raise NotImplementedError

    def _dispatch(self, kind: str, args: tuple[Any, ...]) -> Any:
        """Answer a message of the process other than ready, failed and health."""
        raise NotImplementedError

    def _on_ready(self, again: bool) -> None:
        """The process said ready (``again``: after a restart)."""

    def _on_health(self, healthy: bool) -> None:
        """The process's health changed."""

    def _before_restart(self) -> None:
        """Run before each restart (not before the first start)."""

    def _death(self, code: int | None, delay: float) -> None:
        """Log the death of the process (or its failure to start: ``self._failed``)."""
        why = f"could not start ({self._failed})" if self._failed else "died"
        later = f" in {delay:.0f} s" if delay else ""
        logger.error(
            "%s: %s (PID %s) %s (%s); restarting it%s",
            self.area,
            self.what,
            self.pid or "?",
            why,
            exit_text(code),
            later,
        )

    # -- life ------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The process's PID (None before the first start)."""
        process = self._process
        return None if process is None else process.pid

    @property
    def healthy(self) -> bool:
        """The process runs, says it is healthy, and said so lately."""
        process = self._process
        return (
            self._healthy
            and process is not None
            and process.poll() is None
            and time.monotonic() - self._heard < self.silent_after
        )

    def start(self, cancelled: Callable[[], bool] | None = None) -> bool:
        """Start the process; returns True once it is ready, False when ``cancelled()`` turned
        true first (the process is then stopped), raises :class:`ForwarderError` with its
        reason when it cannot start."""
        try:
            peer = self._spawn()
        except (OSError, subprocess.SubprocessError) as exc:
            raise ForwarderError(f"cannot start {self.what}: {exc}") from None
        self._thread = threading.Thread(
            target=self._supervise, args=(peer,), name=f"{self.area}-calls", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(min(0.1, max(deadline - time.monotonic(), 0.0))):
            if cancelled is not None and cancelled():
                self._stop_process(None, 0.0)
                return False
            if time.monotonic() >= deadline:
                break
        if not self._ever_up:
            reason = self._failed or f"it did not start within {self.start_timeout:.0f} s"
            self._stop_process(None, 0.0)
            raise ForwarderError(f"{self.what} failed: {reason}")
        return True

    def tell(self, kind: str, *args: Any) -> None:
        """Send the process a message, not waited for; lost when it is not running (or
        stuck: it is then killed and started again)."""
        peer = self._peer
        if peer is not None:
            self._send(peer, kind, *args)

    def dump_threads(self) -> None:
        """Have the process write every thread's stack to the log (SIGUSR1, as the daemon's)."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGUSR1)

    def _send(self, peer: Peer, kind: str, *args: Any) -> None:
        # Until it said ready a child may be busy starting (imports, opening the queue) and
        # not reading yet: only the start's own deadline makes it stuck.
        deadline = self.send_timeout if self._up and peer is self._peer else self.start_timeout
        try:
            peer.send(kind, *args, timeout=deadline)
        except PeerStuck as exc:
            self._kill(peer, f"does not read its messages ({exc})")
        except PeerGone:
            pass  # it is exiting: the supervisor restarts it (or the daemon is stopping)

    def _kill(self, peer: Peer, why: str) -> None:
        """Kill a stuck process (the supervisor then restarts it)."""
        process = self._process
        if process is None or peer not in (self._peer, self._spawning):
            return
        if process.poll() is not None:
            return
        logger.error("%s: %s (PID %d) %s; killing it", self.area, self.what, process.pid, why)
        with contextlib.suppress(OSError):
            process.kill()

    def _stop_process(self, message: tuple[Any, ...] | None, wait: float) -> None:
        """Tell the process to stop with ``message`` (sent unless None), wait ``wait`` seconds
        for it to exit, then kill it; and wait for the supervisor."""
        self._request_stop(message)
        process = self._process
        if process is not None:
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                logger.error("%s: %s did not stop; killing it", self.area, self.what)
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(_STOP_GRACE)

    def _request_stop(self, message: tuple[Any, ...] | None) -> None:
        with self._life:  # a restart spawning now has finished: its child is the one told
            self._stopping.set()
            peer = self._peer
        if peer is not None and message is not None:
            self._send(peer, *message)

    # -- the process -------------------------------------------------------------------------

    def _spawn(self) -> Peer:
        ours, theirs = socket.socketpair()
        passed, others = self._descriptors()
        fds = (theirs.fileno(), *passed)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", self.module, *map(str, fds), str(os.getpid())],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )
        except (OSError, subprocess.SubprocessError):
            ours.close()
            raise
        finally:
            theirs.close()
            for s in others:
                s.close()
        self._spawned()
        peer = Peer(ours, self._handle)
        self._failed = None
        self._up = False
        self._heard = self._spawned_at = time.monotonic()
        with self._lock:
            self._spawning = peer
            try:
                self._init(peer)
            finally:
                self._spawning = None
            self._peer = peer
        return peer

    def _supervise(self, peer: Peer) -> None:
        """Read the process's messages; when it dies, start it again (unless stopping)."""
        deaths = 0
        while True:
            started = time.monotonic()
            try:
                code = self._serve_until_exit(peer)
            except Exception:  # a bug of ours: the process must come back all the same
                logger.exception("%s: serving %s failed", self.area, self.what)
                code = self._end_process()
            if not self._ever_up:  # the first one never started: start() says why
                self._failed = self._failed or f"it exited with {exit_text(code)}"
                self._ready.set()
                return
            if self._stopping.is_set():
                return
            deaths = 1 if time.monotonic() - started > _STEADY else deaths + 1
            delay = self.restart_delays[min(deaths, len(self.restart_delays)) - 1]
            self._death(code, delay)
            if self._stopping.wait(delay):
                return
            again = self._restart()
            if again is None:
                return
            peer = again

    def _serve_until_exit(self, peer: Peer) -> int | None:
        """Read the process's messages until it closes its end; then its exit status (killed
        when it closed without exiting: its messages made no sense)."""
        try:
            peer.serve(idle=HEALTH_EVERY, on_idle=lambda: self._check_silence(peer))
        finally:
            with self._lock:
                if self._peer is peer:
                    self._peer = None
            peer.sock.close()
            self._healthy = False
            self._up = False
        return self._end_process()

    def _check_silence(self, peer: Peer) -> None:
        now = time.monotonic()
        silent = now - self._heard
        locked = self.queue_locked() if self.queue_locked is not None else 0.0
        if self._up and silent >= self.kill_after:
            self._kill(peer, f"has said nothing for {silent:.0f} s (stopped, or hung)")
        elif self._up and silent >= LOCKED_SILENCE and locked >= LOCKED_SILENCE:
            self._kill(
                peer,
                f"has said nothing for {silent:.0f} s while the daemon has waited {locked:.0f} s "
                "for the queue's write lock (stopped or hung, perhaps inside a queue transaction)",
            )
        elif not self._up and self._ever_up and now - self._spawned_at >= self.start_timeout:
            # A restart hanging in its start (the first start's deadline is start()'s).
            self._kill(peer, f"did not start within {self.start_timeout:.0f} s")

    def _end_process(self) -> int | None:
        process = self._process
        if process is None:
            return None
        try:
            return process.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            logger.error(
                "%s: %s (PID %d) stopped talking; killing it", self.area, self.what, process.pid
            )
            process.kill()
            return process.wait()

    def _restart(self) -> Peer | None:
        """Start another process (None: stopping)."""
        try:
            self._before_restart()
        except Exception:  # the restart matters more
            logger.exception("%s: preparing the restart of %s failed", self.area, self.what)
        while True:
            with self._life:
                if self._stopping.is_set():
                    return None
                try:
                    return self._spawn()
                except (OSError, subprocess.SubprocessError) as exc:
                    logger.error("%s: cannot start %s: %s; retrying", self.area, self.what, exc)
            if self._stopping.wait(_RETRY_SPAWN):
                return None

    # -- its messages ------------------------------------------------------------------------

    def _handle(self, kind: str, args: tuple[Any, ...]) -> Any:
        self._heard = time.monotonic()
        if kind == "health":
            healthy = bool(args[0])
            changed = healthy != self._healthy and self._up
            self._healthy = healthy and self._up
            if changed:
                self._hook(self._on_health, healthy)
            return None
        if kind == "ready":
            self._healthy = self._up = True
            again = self._ever_up
            self._ever_up = True
            self._hook(self._on_ready, again)
            self._ready.set()
            return None
        if kind == "failed":  # it exits next: _supervise says why (or start() does)
            self._failed = str(args[0])
            return None
        return self._dispatch(kind, args)

    def _hook(self, hook: Callable[[bool], None], value: bool) -> None:
        try:
            hook(value)
        except Exception:  # a bug of ours: the process goes on
            logger.exception("%s: handling %s's news failed", self.area, self.what)


def exit_text(code: int | None) -> str:
    """A process's exit status in words."""
    if code is None:
        return "unknown status"
    if code < 0:
        return f"signal {-code}"
    return f"exit status {code}"
