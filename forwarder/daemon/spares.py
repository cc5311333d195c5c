"""Spare associations: those beyond the first that a peer may not take.

A destination configured with ``associations: N`` gets N sending threads, each with its own
association. Some peers serve fewer at a time (DCMTK ``storescp`` without ``--fork`` serves one;
a PACS may cap associations per calling AE): the extra association is refused, or, worse, its
A-ASSOCIATE-RQ is accepted by the kernel and answered only when the first association ends, so
the request waits for the response timeout. While a sibling's association works, the
destination is *not* down: only that thread waits.

This module learns that limit instead of paying for it again and again:

- with no association open, only the first thread claims and associates; a thread whose
  association is closed while a sibling's is open asks the peer for its association *before*
  claiming files (:meth:`SpareAssociations.may_claim`), so no batch of files waits with it;
- each failed try pauses that thread for longer (``retry`` backoff, up to ``retry.max_delay``);
- the limit is logged once per destination, with the setting that would match it, and the
  thread says when the peer takes the association again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from forwarder.config import Destination, RetryPolicy
from forwarder.daemon.channels import SendChannel
from forwarder.daemon.outcomes import backoff
from forwarder.net.channel import SendOutcome

logger = logging.getLogger(__name__)


class SpareAssociations:
    """The spare-association state of one destination's threads (``channels``: index ->
    that thread's channel, shared with the worker)."""

    def __init__(
        self, destination: Destination, retry: RetryPolicy, channels: Mapping[int, SendChannel]
    ) -> None:
        self._name = destination.name
        self._configured = destination.associations
        self._retry = retry
        self._channels = channels
        self._pause: dict[int, float] = {}  # thread index -> monotonic time it may try again
        self._misses: dict[int, int] = {}  # thread index -> failed tries in a row
        self._limit_noted = False

    def paused(self, index: int, now: float) -> bool:
        """Whether thread ``index`` waits before asking for its association again."""
        return now < self._pause.get(index, 0.0)

    def may_claim(
        self,
        channel: SendChannel,
        index: int,
        work_due: Callable[[], bool],
        hints: Callable[[], Sequence[tuple[str, str]]],
    ) -> bool:
        """Whether thread ``index`` may claim files now. With no association open, only the
        first thread does. A spare (its channel closed while a sibling's is open) with work due
        first opens its association, for the pending SOP classes and transfer syntaxes
        (``hints``), holding no file while the peer answers; False when the peer did not take
        it (the thread pauses)."""
        if channel.is_open:
            return True
        if not self.sibling_open(index):
            # No association open: the first thread opens one (and finds out whether the peer
            # is up at all); the others follow once it works, as spares.
            return index == 0
        if not work_due():
            return True  # nothing to send: the claim comes back empty
        needs = hints()
        if not needs:
            return True  # nothing known to propose: the normal path opens with the first file
        if channel.open(needs):
            if self._misses.pop(index, 0):
                logger.info(
                    "%s: association %d is available again; sending on it", self._name, index + 1
                )
            return True
        if channel.down is None:
            return False  # interrupted by the stop, not refused: the peer's limit is not known
        if not self.sibling_open(index):
            # The others closed meanwhile: the destination itself may be down, which the
            # normal path (claim, try, hold or back off) handles and reports.
            return True
        self.missed(channel, index)
        return False

    def unavailable(self, outcome: SendOutcome, index: int) -> bool:
        """Whether a file's failure is this spare association's, not the file's: its
        association failed in this batch while a sibling's works. Whatever the rejection
        (some peers reject an extra association permanently), the destination is not down.
        A file's own failure on a channel whose last association attempt failed long ago
        is that file's, and charged to it."""
        return outcome.association_failed and self.sibling_open(index)

    def missed(self, channel: SendChannel, index: int) -> None:
        """Thread ``index``'s association was not available: pause it, longer each time in a
        row, and log the peer's limit once."""
        misses = self._misses.get(index, 0) + 1
        self._misses[index] = misses
        pause = backoff(self._retry, misses)
        self._pause[index] = time.monotonic() + pause
        open_now = sum(c.is_open for c in self._channels.values())
        if self._limit_noted:
            logger.debug(
                "%s: association %d still not available (%s); next try in %.1fs",
                self._name,
                index + 1,
                channel.down,
                pause,
            )
            return
        self._limit_noted = True
        logger.warning(
            "%s: the peer took only %d of the %d associations configured (association %d: %s); "
            "sending on %d, asking for more less and less often (up to every %gs). Set "
            "associations: %d for this destination if that is its limit",
            self._name,
            open_now,
            self._configured,
            index + 1,
            channel.down,
            open_now,
            self._retry.max_delay,
            max(open_now, 1),
        )

    def sibling_open(self, index: int) -> bool:
        return any(c.is_open for i, c in self._channels.items() if i != index)
