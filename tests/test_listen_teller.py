"""The receiving process's Teller (forwarder/daemon/listen_child.py): the daemon hears of the
objects queued in the receiving process in few messages, the first after a pause at once,
and nothing noted is left untold at close."""

from __future__ import annotations

import threading

from conftest import wait_until

from forwarder.daemon.listen_child import Teller


def test_the_first_object_is_told_at_once_and_those_close_behind_it_in_one_message() -> None:
    sent: list[int] = []
    teller = Teller(sent.append, apart=0.5)
    try:
        teller.note()
        wait_until(lambda: sent == [1], 5, what="the first object told alone")
        for _ in range(5):  # within the half second after that message
            teller.note()
        wait_until(lambda: sum(sent) == 6, 5, what="all six told")
        assert sent == [1, 5]
    finally:
        teller.close()


def test_close_tells_what_is_pending() -> None:
    sent: list[int] = []
    teller = Teller(sent.append, apart=0.5)
    teller.note()
    wait_until(lambda: sent == [1], 5, what="the first object told")
    teller.note()
    teller.note()
    teller.close()  # the thread is between messages: it tells the two, then ends
    assert sent == [1, 2]
    assert not any(t.name == "listen-teller" and t.is_alive() for t in threading.enumerate())


def test_a_message_that_cannot_be_sent_does_not_end_the_telling() -> None:
    sent: list[int] = []
    failures = [RuntimeError("the daemon is going away")]

    def send(count: int) -> None:
        if failures:
            raise failures.pop()
        sent.append(count)

    teller = Teller(send, apart=0.01)
    try:
        teller.note()
        wait_until(lambda: not failures, 5, what="the failed message")
        teller.note()
        wait_until(lambda: sent == [1], 5, what="the next object told")
    finally:
        teller.close()
