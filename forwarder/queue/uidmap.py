"""The UID map of de-identification: an original UID -> the UID that replaces it, kept in the
queue database, so that every file of a study gets the same new Study Instance UID, whichever
route or worker sends it, before and after a restart (PS3.15 E.3.9: "internally consistent").

A new UID is ``2.25.`` and a random 128-bit number (PS3.5 B.2), made here; the map only grows
(one row per distinct original UID, ~150 bytes) and is never pruned: a study sent again a year
later must get the same UIDs. Mappings are committed before the object using them is sent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from forwarder.queue.store import Store


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


class UidMap(Store):
    """De-identification's part of :class:`forwarder.queue.Queue`."""

    def replacement_uids(self, originals: Iterable[str]) -> dict[str, str]:
        """The replacement of each original UID, made (and committed) for those that have
        none yet; one transaction for all of them."""
        wanted = list(dict.fromkeys(originals))
        if not wanted:
            return {}
        now = time.time()
        with self._write("mapping UIDs") as conn:
            out: dict[str, str] = {}
            for original in wanted:
                row = conn.execute(
                    "SELECT replacement FROM uid_map WHERE original = :o", {"o": original}
                ).fetchone()
                if row is None:
                    replacement = new_uid()
                    conn.execute(
                        "INSERT INTO uid_map (original, replacement, created_at) "
                        "VALUES (:o, :r, :t)",
                        {"o": original, "r": replacement, "t": now},
                    )
                    out[original] = replacement
                else:
                    out[original] = str(row[0])
        return out
