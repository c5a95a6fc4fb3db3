"""Hypothesis state machine: producer and consumer against a model queue.

Besides FIFO equality it checks the two no-lost-wake-up invariants: a sleeping
consumer with no doorbell pending sees an empty ring, and a producer sleeping
for space with no doorbell pending really lacks that space.
"""

from __future__ import annotations

from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shared.ring import (
    RingConsumer,
    RingFullError,
    RingProducer,
    RingSpec,
    initialise_ring,
    record_size,
)

SIZE = 4096
MAX_RECORD = 1500
frames = st.binary(min_size=0, max_size=MAX_RECORD)


class RingMachine(RuleBasedStateMachine):
    @initialize(initial=st.sampled_from([0, 8, 2**31, 2**32 - 4096, 2**32 - 8]))
    def setup(self, initial: int) -> None:
        spec = RingSpec.standalone(SIZE, MAX_RECORD)
        self.buf = bytearray(spec.end)
        initialise_ring(self.buf, spec, initial_index=initial)
        self.prod = RingProducer(self.buf, spec)
        self.cons = RingConsumer(self.buf, spec)
        self.model: deque[bytes] = deque()
        self.unpublished: list[bytes] = []
        self.consumer_asleep = False
        self.consumer_doorbell = False
        self.producer_waiting_for: int | None = None
        self.producer_doorbell = False

    def used(self) -> int:
        return sum(record_size(len(f)) for f in [*self.model, *self.unpublished])

    @precondition(lambda self: self.producer_waiting_for is None)
    @rule(frame=frames)
    def send(self, frame: bytes) -> None:
        fits = self.used() + record_size(len(frame)) <= SIZE
        try:
            notify = self.prod.send_nowait(frame)
        except RingFullError:
            assert not fits
            has_space = self.prod.prepare_wait_space(len(frame))
            assert not has_space, "prepare_wait_space saw space the model says is missing"
            self.producer_waiting_for = len(frame)
            return
        assert fits
        self.model.extend(self.unpublished)
        self.unpublished.clear()
        self.model.append(frame)
        self.consumer_doorbell |= notify

    @precondition(lambda self: self.producer_waiting_for is None)
    @rule(frame=frames)
    def write_unpublished(self, frame: bytes) -> None:
        fits = self.used() + record_size(len(frame)) <= SIZE
        try:
            self.prod.write_nowait(frame)
        except RingFullError:
            assert not fits
            return
        assert fits
        self.unpublished.append(frame)

    @rule()
    def publish(self) -> None:
        notify = self.prod.publish()
        if not self.unpublished:
            assert not notify
        self.model.extend(self.unpublished)
        self.unpublished.clear()
        self.consumer_doorbell |= notify

    @precondition(lambda self: not self.consumer_asleep)
    @rule()
    def receive(self) -> None:
        item = self.cons.receive_nowait()
        if not self.model:
            assert item is None
            return
        assert item is not None
        frame, wake = item
        assert frame == self.model.popleft()
        self.producer_doorbell |= wake

    @precondition(lambda self: not self.consumer_asleep)
    @rule()
    def consumer_tries_to_sleep(self) -> None:
        if self.cons.prepare_wait():
            assert self.model, "final check reported data on an empty ring"
        else:
            assert not self.model, "consumer would sleep with published frames"
            self.consumer_asleep = True

    @precondition(lambda self: self.consumer_asleep and self.consumer_doorbell)
    @rule()
    def consumer_wakes(self) -> None:
        self.consumer_asleep = False
        self.consumer_doorbell = False

    @precondition(lambda self: self.producer_waiting_for is not None and self.producer_doorbell)
    @rule()
    def producer_wakes(self) -> None:
        self.producer_waiting_for = None
        self.producer_doorbell = False

    @invariant()
    def no_lost_consumer_wakeup(self) -> None:
        if hasattr(self, "model") and self.consumer_asleep and not self.consumer_doorbell:
            assert not self.model, "frames published to a sleeping consumer without a doorbell"

    @invariant()
    def no_lost_producer_wakeup(self) -> None:
        if not hasattr(self, "model") or self.producer_waiting_for is None:
            return
        if not self.producer_doorbell:
            free = SIZE - self.used()
            assert free < record_size(self.producer_waiting_for), (
                "space was freed for a sleeping producer without a doorbell"
            )

    @invariant()
    def free_space_matches_model(self) -> None:
        if hasattr(self, "model"):
            assert self.prod.free_space() == SIZE - self.used()


TestRingStateMachine = RingMachine.TestCase
TestRingStateMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
