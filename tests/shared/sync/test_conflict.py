"""ConflictDetector and ThreadConflictDetector: the one "one user at a time" rule."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from shared.evtchn import InMemoryPort
from shared.sync import ConflictDetector, ThreadConflictDetector


def test_a_second_user_is_refused_with_the_detectors_message() -> None:
    detector = ConflictDetector("another task is already frobbing")
    assert not detector.held
    with detector:
        assert detector.held
        with pytest.raises(trio.BusyResourceError, match="already frobbing"), detector:
            pass  # pragma: no cover - never entered
        assert detector.held  # the refused second user did not release the first one's claim
    assert not detector.held
    with detector:  # free again
        pass


def test_the_claim_ends_with_the_block_even_when_it_raises() -> None:
    detector = ConflictDetector("busy")
    with pytest.raises(ValueError), detector:
        raise ValueError("inside")
    assert not detector.held
    assert isinstance(detector.error(), trio.BusyResourceError)
    assert str(detector.error()) == "busy"


async def test_two_tasks_waiting_on_one_port_is_busy() -> None:
    # Port.wait spells the detector out on the doorbell path; same rule, same error.
    port, peer = InMemoryPort.pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(port.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError, match="already waiting on this port"):
            await port.wait()
        peer.notify()  # the first waiter wakes and returns
    peer.notify()
    await port.wait()  # free again: the refused waiter did not take the claim away


def test_thread_detector_refuses_a_second_thread_and_frees_after() -> None:
    detector = ThreadConflictDetector("another thread is already sending")
    outcome: list[BaseException | None] = []

    def second() -> None:
        try:
            with detector:
                pass  # pragma: no cover - the first thread holds it
            outcome.append(None)
        except trio.BusyResourceError as exc:
            outcome.append(exc)

    with detector:
        assert detector.held
        other = threading.Thread(target=second)
        other.start()
        other.join()
    assert isinstance(outcome[0], trio.BusyResourceError)
    assert "already sending" in str(outcome[0])
    assert not detector.held
    # The spelled-out form of the blocking transports' request path: claim, release.
    assert detector.claim()
    assert not detector.claim()
    detector.release()
    assert not detector.held


def test_thread_detector_lets_exactly_one_of_many_threads_in() -> None:
    detector = ThreadConflictDetector("busy")
    leave = threading.Event()
    entered: list[int] = []
    refused = threading.Semaphore(0)
    barrier = threading.Barrier(8)

    def contender(i: int) -> None:
        barrier.wait()  # all eight try at once
        try:
            with detector:
                entered.append(i)
                leave.wait(30)  # stay inside until every other one has been refused
        except trio.BusyResourceError:
            refused.release()

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for _ in range(7):
        assert refused.acquire(timeout=30), "a contender was neither let in nor refused"
    leave.set()
    for t in threads:
        t.join()
    assert len(entered) == 1
