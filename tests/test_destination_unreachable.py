"""What the proof threads read of C-STORE's view of a destination
(:attr:`forwarder.daemon.destination_state.DestinationState.unreachable`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from forwarder.config.models import RetryPolicy
from forwarder.daemon.destination_state import DestinationState
from forwarder.queue import Queue


class _Refused:
    """A channel's reason for not associating, as the sender gives it: permanent here, so
    one failure opens the breaker."""

    retryable = False
    not_before = 0.0  # no Retry-After

    def __str__(self) -> str:
        return "association rejected (permanent)"


def test_a_destination_down_outside_its_send_window_does_not_hold_the_proofs(
    tmp_path: Path,
) -> None:
    """No probe goes out while the send window is closed, so an open breaker would stay open
    until the window opens (14 h for a night-only window) and hold every proof of delivery:
    outside the window the proofs try for themselves, as before the breaker was consulted."""
    queue = Queue(tmp_path / "queue.sqlite")
    try:
        state = DestinationState("pacs", RetryPolicy(), queue, None)
        channel: Any = SimpleNamespace(down=_Refused(), associations_opened=0)
        state.update(channel, association_failed=True)
        assert state.is_down and state.unreachable
        state.set_gate("outside_window")
        assert not state.unreachable
        state.set_gate("paused")  # paused: the proofs skip it themselves; the breaker stands
        assert state.unreachable
        state.set_gate(None)
        assert state.unreachable
    finally:
        queue.close()
