"""Operator control: destinations paused by ``forwarder pause`` until ``forwarder resume``.

A row in ``paused_destinations`` is the pause itself, so it is kept across restarts and any
process can set it: the daemon's workers read :meth:`Control.paused` at least once a second
and stop claiming for a paused destination (a send under way finishes). Nothing here changes a
job.
"""

from __future__ import annotations

from forwarder.queue.store import Store, clock


class Control(Store):
    """Paused destinations (a part of :class:`forwarder.queue.Queue`)."""

    def pause(self, destination: str, *, now: float | None = None) -> bool:
        """Pause ``destination``; False when it was paused already (since then)."""
        with self._write(f"pausing {destination}") as conn:
            rows = conn.execute(
                """INSERT INTO paused_destinations (destination, at) VALUES (:destination, :at)
                   ON CONFLICT (destination) DO NOTHING RETURNING destination""",
                {"destination": destination, "at": clock(now)},
            ).fetchall()
        return bool(rows)

    def resume(self, destination: str) -> bool:
        """Resume ``destination``; False when it was not paused."""
        with self._write(f"resuming {destination}") as conn:
            rows = conn.execute(
                "DELETE FROM paused_destinations WHERE destination = :destination "
                "RETURNING destination",
                {"destination": destination},
            ).fetchall()
        return bool(rows)

    def paused(self) -> dict[str, float]:
        """destination -> since when (Unix time) it is paused."""
        with self._read("reading paused destinations") as conn:
            rows = conn.execute("SELECT destination, at FROM paused_destinations").fetchall()
        return {str(r[0]): float(r[1]) for r in rows}
