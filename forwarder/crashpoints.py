"""Test hook: SIGKILL the daemon at a named point, to prove crash safety at exact windows.

Set ``FORWARDER_CRASH_AT=NAME`` (or ``NAME:N`` to die at the N-th time the point is reached).
Unset in production, where :func:`crash_point` is one dictionary lookup. Points:

- ``ingest-before-commit``: files read and routed, their jobs not yet committed;
- ``retire-before-move``: a queued file replaced by one not queued (not DICOM any more, no
  route, discarded): the row of its earlier version ended, the file not yet moved out;
- ``mid-store``: part of a data set sent, the rest not;
- ``after-response``: the peer answered Success, the queue not yet acked;
- ``finish-before-move``: the final path recorded (FINISHING), the file not yet moved;
- ``finish-after-move``: the file moved, the queue not yet told;
- ``reload``: in the middle of applying a reloaded config;
- ``listen-after-place``: a received object fsynced under ``incoming/.listen``, not yet routed;
- ``listen-before-commit``: routed, its queue commit not yet made;
- ``listen-before-answer``: queued, Success not yet answered to the modality.
- ``stgcmt-before-action``: a storage commitment transaction recorded, its N-ACTION not sent;
- ``stgcmt-before-record``: a trusted commitment report received, its outcome not recorded;
- ``query-before-find``: a verify_by_query round recorded, its C-FINDs not sent.
- ``retry-before-move``: ``forwarder retry`` queued a failed file again, not yet moved it back
  (the retry command's own process dies);
- ``retry-after-move``: ``forwarder retry`` moved a failed file back into incoming (its
  ``NAME.error.json`` was removed from failed/ just before), not yet counted it.
"""

from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("FORWARDER_CRASH_AT", "")
_NAME, _, _COUNT = _SPEC.partition(":")
_AT = int(_COUNT) if _COUNT.isdigit() else 1
#: Set in the daemon's receiving and watch-and-ingest processes (``listen_wire.child_env``): the
#: daemon they belong to dies with them, as the one daemon the tests kill.
_PARENT = os.environ.get("FORWARDER_CRASH_PARENT", "")
_hits = 0
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Die here, at once and without cleanup, if the environment asks for it."""
    global _hits
    if name != _NAME:
        return
    with _lock:
        _hits += 1
        if _hits < _AT:
            return
    if _PARENT.isdigit():
        os.kill(int(_PARENT), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
