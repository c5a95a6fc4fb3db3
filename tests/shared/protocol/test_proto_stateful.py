"""Hypothesis state machine: a frontend and a backend Connection joined through bytes.

Both roles run sans-I/O; two queues carry the frames. Each step either side
tries to send something (mostly legal, sometimes a mistake), a queue delivers
a frame, or a hostile peer injects an arbitrary message or garbage. Checked
throughout:

* one rule, both directions: whatever an honest side's ``send`` accepts, the
  other side's ``receive`` accepts (no RemoteProtocolError without hostility);
* a refused send (LocalProtocolError) changes nothing;
* ``receive`` raises only RemoteProtocolError; a fatal one leaves ERROR, an
  answerable one leaves OPEN with exactly one ErrorReply to send;
* ``can_send`` agrees with the state table that ``send`` enforces;
* exactly one reply per request, and both sides' bookkeeping agrees whenever
  the queues are empty;
* ``send_reply`` never fails for size: a reply too large for the frontend
  becomes an ErrorReply that fits.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from _proto_samples import messages
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from shared.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from shared.protocol import (
    HOTPLUG_FEATURE,
    TERMINAL_STATES,
    ConfigReadRequest,
    Connection,
    ConnectionState,
    DeviceChangeAck,
    DeviceInfo,
    DeviceRemovedEvent,
    DmaCallResult,
    DmaReadCall,
    DmaWriteCall,
    DoneReply,
    ErrorReply,
    Goodbye,
    HandshakeRejected,
    InterruptEvent,
    Limits,
    Message,
    MessageTooLargeError,
    PeerOverLimitError,
    PingRequest,
    Reply,
    Role,
    SnapshotReply,
    ValueReply,
    encode,
)

S = ConnectionState
small_limits = st.builds(Limits, st.sampled_from([256, 512, 4096]), st.integers(1, 4))
versions = st.sampled_from([(1, 0), (1, 3), (1, 1), (2, 0)])
# Mostly with hot-plug (both sides must offer it), sometimes without.
feature_sets = st.sampled_from(
    [["a", HOTPLUG_FEATURE], [HOTPLUG_FEATURE], ["c", HOTPLUG_FEATURE, "a"], ["a"], []]
)
garbage = st.binary(max_size=40)
#: Goodbye and HandshakeRejected end a run: the goodbye rule says them, rarely.
non_final_messages = messages.filter(lambda m: not isinstance(m, Goodbye | HandshakeRejected))


def _snapshot(conn: Connection) -> tuple[Any, ...]:
    return (
        conn.state,
        conn.outstanding,
        conn.outstanding_calls,
        conn.owed_calls,
        conn.limits,
        conn.peer_limits,
        conn.version,
        conn.features,
        conn.guest,
    )


class ProtocolMachine(RuleBasedStateMachine):
    @initialize(
        client_limits=small_limits,
        server_limits=small_limits,
        client_version=versions,
        server_version=versions,
        client_features=feature_sets,
        server_features=feature_sets,
        liars=st.booleans(),
    )
    def setup(
        self,
        client_limits: Limits,
        server_limits: Limits,
        client_version: tuple[int, int],
        server_version: tuple[int, int],
        client_features: list[str],
        server_features: list[str],
        liars: bool,
    ) -> None:
        self.client = Connection(
            Role.CLIENT,
            limits=client_limits,
            features=client_features,
            guest="guest0",
            version=client_version,
        )
        self.server = Connection(
            Role.SERVER, limits=server_limits, features=server_features, version=server_version
        )
        self.to_server: deque[bytes] = deque()
        self.to_client: deque[bytes] = deque()
        #: Set once a hostile frame was injected: remote errors are then expected on
        #: either side (the backend may answer the liar's requests to the frontend).
        self.hostile = False
        #: Half the runs are honest throughout, so the honest-path checks get every step.
        self.liars = liars
        #: Calls the frontend owes: the data length an honest result carries.
        self._owed_length: dict[int, int] = {}
        #: Requests the honest client sent, and replies it received for each.
        self.replies: dict[int, int] = {}
        self.sent_requests: set[int] = set()

    # ------------------------------------------------------------------ helpers

    def _conn(self, role: Role) -> Connection:
        return self.client if role is Role.CLIENT else self.server

    def _queue_to_peer(self, role: Role) -> deque[bytes]:
        return self.to_server if role is Role.CLIENT else self.to_client

    def _try_send(self, role: Role, msg: Message) -> bool:
        """Send ``msg`` from ``role``; a refusal must change nothing."""
        conn = self._conn(role)
        before = _snapshot(conn)
        allowed = conn.can_send(msg)
        try:
            data = conn.send(msg)
        except LocalProtocolError:
            assert _snapshot(conn) == before, "a refused send changed the connection"
            return False
        assert allowed, f"send() accepted {msg!r}, which can_send() said the state forbids"
        assert len(data) <= conn.peer_limits.max_message_size
        self._queue_to_peer(role).append(data)
        if role is Role.CLIENT and isinstance(msg, ConfigReadRequest | PingRequest):
            self.sent_requests.add(msg.request_id)
            self.replies.setdefault(msg.request_id, 0)
        return True

    def _deliver(self, role: Role, queue: deque[bytes]) -> None:
        conn = self._conn(role)
        frame = queue.popleft()
        if conn.state in TERMINAL_STATES:
            queue.clear()  # a real end closes its transport: nothing more is read
            return
        try:
            msg = conn.receive(frame)
        except PeerOverLimitError as exc:
            assert self.hostile, f"an honest frontend went over the limit: {exc}"
            self._answer_error(exc)
            return
        except RemoteProtocolError as exc:
            if conn.state is S.ERROR:
                assert self.hostile, f"honest traffic was refused by the {role}: {exc}"
                assert conn.error_reply_for(exc) is None
                assert conn.can_send(Goodbye(ErrorCode.PROTOCOL_ERROR, ""))
                assert not conn.can_send(DoneReply(0))
                return
            assert self.hostile, f"honest traffic was refused by the {role}: {exc}"
            self._answer_error(exc)
            return
        if role is Role.CLIENT and isinstance(msg, Reply) and msg.request_id in self.replies:
            self.replies[msg.request_id] += 1

    def _answer_error(self, exc: RemoteProtocolError) -> None:
        """An answerable error: the backend stays OPEN and owes exactly one ErrorReply."""
        assert self.server.state is S.OPEN
        answer = self.server.error_reply_for(exc)
        assert isinstance(answer, ErrorReply)
        self.server.send_reply(answer)  # the hostile side's queue is not read back

    # ------------------------------------------------------------------ the frontend

    @precondition(lambda self: self.client.state is S.START)
    @rule()
    def client_hello(self) -> None:
        self._try_send(Role.CLIENT, self.client._handshake.make_hello(self.client.limits))

    @precondition(lambda self: self.client.state is S.OPEN)
    @rule(burst=st.integers(1, 6), reuse=st.booleans(), offset=st.integers(0, 0xFFF))
    def client_requests(self, burst: int, reuse: bool, offset: int) -> None:
        """A pipelining frontend: a burst of requests, up to (and one over) the limit."""
        for _ in range(burst):
            if reuse and self.client.outstanding:  # a mistake: an id still outstanding
                rid = min(self.client.outstanding)
            else:
                rid = self.client.next_request_id()
            msg: Message = PingRequest(rid) if offset % 2 else ConfigReadRequest(rid, 0, offset, 1)
            self._try_send(Role.CLIENT, msg)

    @precondition(lambda self: self.client.state is S.OPEN)
    @rule(honest=st.booleans(), data=st.data())
    def client_answers_a_call(self, honest: bool, data: st.DataObject) -> None:
        owed = sorted(self.client.owed_calls)
        if honest and owed:
            cid = data.draw(st.sampled_from(owed))
            # The frontend remembers what it owes; reads need exactly their length.
            length = self._owed_length.get(cid, 0)
            msg = DmaCallResult(cid, ErrorCode.OK, b"\x5a" * length)
        else:
            msg = DmaCallResult(data.draw(st.integers(0, 8)), ErrorCode.OK, b"x")
        if self._try_send(Role.CLIENT, msg):
            self._owed_length.pop(msg.call_id, None)

    @rule(role=st.sampled_from(list(Role)), dice=st.integers(0, 7))
    def goodbye(self, role: Role, dice: int) -> None:
        if dice == 7:  # rarely: a Goodbye ends the interesting part of a run
            self._try_send(role, Goodbye(ErrorCode.OK, "bye"))

    # ------------------------------------------------------------------ the backend

    @precondition(lambda self: self.server.state is S.HELLO_RECEIVED)
    @rule(dice=st.integers(0, 7))
    def server_answers_hello(self, dice: int) -> None:
        reject = dice == 7
        before = _snapshot(self.server)
        try:
            if reject or self.server.check_version() is not None:
                data = self.server.reject(ErrorCode.UNKNOWN_GUEST, "no")
            else:
                data = self.server.accept()
        except LocalProtocolError:
            assert _snapshot(self.server) == before
            return
        self.to_client.append(data)

    @precondition(lambda self: self.server.state is S.OPEN)
    @rule(data=st.data(), kind=st.sampled_from(["done", "value", "error", "snapshot"]))
    def server_replies(self, data: st.DataObject, kind: str) -> None:
        pending = sorted(self.server.outstanding)
        rid = data.draw(st.sampled_from(pending)) if pending else data.draw(st.integers(0, 8))
        reply: Reply
        if kind == "done":
            reply = DoneReply(rid)
        elif kind == "value":
            reply = ValueReply(rid, 7)
        elif kind == "error":
            reply = ErrorReply(rid, ErrorCode.INVALID_OFFSET, "x" * 1000)
        else:
            dev = DeviceInfo(8, 0x1234, 0x11E8, 0xFF00, 0x10, 0, 0, 0, bytes(4096))
            reply = SnapshotReply(rid, (dev,) * data.draw(st.integers(0, 2)))
        before = _snapshot(self.server)
        try:
            frame = self.server.send_reply(reply)
        except MessageTooLargeError as exc:  # never: send_reply answers with an ErrorReply
            raise AssertionError("send_reply let a size refusal escape") from exc
        except LocalProtocolError:
            assert _snapshot(self.server) == before
            return
        assert len(frame) <= self.server.peer_limits.max_message_size
        self.to_client.append(frame)

    @precondition(lambda self: self.server.state is S.OPEN)
    @rule(read=st.booleans(), length=st.integers(1, 600))
    def server_calls(self, read: bool, length: int) -> None:
        cid = self.server.next_call_id()
        msg: Message = DmaReadCall(cid, 0, length) if read else DmaWriteCall(cid, 0, b"w" * 8)
        if self._try_send(Role.SERVER, msg):
            self._owed_length[cid] = length if read else 0

    @precondition(lambda self: self.server.state is S.OPEN)
    @rule(burst=st.integers(1, 5))
    def server_hotplug(self, burst: int) -> None:
        """Devices leave the bus: legal only with the feature, within the frontend's cap."""
        for device in range(burst):
            change = DeviceRemovedEvent(self.server.next_change_id(), device, "")
            self._try_send(Role.SERVER, change)

    @precondition(lambda self: self.client.state is S.OPEN)
    @rule(honest=st.booleans(), data=st.data())
    def client_acknowledges(self, honest: bool, data: st.DataObject) -> None:
        owed = sorted(self.client.owed_changes)
        if honest and owed:
            cid = data.draw(st.sampled_from(owed))
        else:  # perhaps a mistake: a change that is not owed
            cid = data.draw(st.integers(0, 8))
        self._try_send(Role.CLIENT, DeviceChangeAck(cid))

    @precondition(lambda self: self.server.state is S.OPEN)
    @rule()
    def server_event(self) -> None:
        self._try_send(Role.SERVER, InterruptEvent(0, 0, 1))

    # ------------------------------------------------------------------ either side

    @rule(role=st.sampled_from(list(Role)), data=st.data())
    def anything(self, role: Role, data: st.DataObject) -> None:
        """Any message at any time: refused (changing nothing), or legal for the peer too."""
        msg = data.draw(non_final_messages, label="message")
        if self._try_send(role, msg) and isinstance(msg, DmaReadCall | DmaWriteCall):
            self._owed_length[msg.call_id] = msg.length if isinstance(msg, DmaReadCall) else 0

    # ------------------------------------------------------------------ the wire

    @precondition(lambda self: bool(self.to_server))
    @rule(frames=st.integers(1, 8))
    def deliver_to_server(self, frames: int) -> None:
        """A read: up to ``frames`` frames arrive together (pipelined requests)."""
        while frames and self.to_server:
            self._deliver(Role.SERVER, self.to_server)
            frames -= 1

    @precondition(lambda self: bool(self.to_client))
    @rule(frames=st.integers(1, 8))
    def deliver_to_client(self, frames: int) -> None:
        while frames and self.to_client:
            self._deliver(Role.CLIENT, self.to_client)
            frames -= 1

    @precondition(lambda self: self.liars)
    @rule(role=st.sampled_from(list(Role)), data=st.data())
    def hostile_frame(self, role: Role, data: st.DataObject) -> None:
        """A lying peer: an arbitrary message (or bytes) arrives before anything queued."""
        self.hostile = True
        msg = data.draw(messages | garbage, label="hostile")
        frame = msg if isinstance(msg, bytes) else encode(msg)
        queue = self.to_server if role is Role.SERVER else self.to_client
        queue.appendleft(frame)
        self._deliver(role, queue)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def exactly_one_reply_each(self) -> None:
        assert all(n <= 1 for n in self.replies.values()), self.replies

    @invariant()
    def can_send_matches_the_table_after_the_end(self) -> None:
        for conn in (self.client, self.server):
            if conn.state in TERMINAL_STATES:
                assert not conn.can_send(PingRequest(1)) and not conn.can_send(DoneReply(1))

    @invariant()
    def honest_sides_agree_when_quiet(self) -> None:
        if self.to_server or self.to_client or self.hostile:
            return
        client, server = self.client, self.server
        if client.state is S.OPEN and server.state is S.OPEN:
            assert client.outstanding == server.outstanding
            assert client.owed_calls == server.outstanding_calls
            assert client.owed_changes == server.outstanding_changes
            assert len(server.outstanding_changes) <= client.limits.max_in_flight
            assert client.version == server.version and client.features == server.features
            assert client.peer_limits == server.limits and server.peer_limits == client.limits
            assert len(server.outstanding) <= server.limits.max_in_flight
            assert len(server.outstanding_calls) <= client.limits.max_in_flight
            answered = {rid for rid, n in self.replies.items() if n}
            assert not answered & client.outstanding


TestProtocolMachine = ProtocolMachine.TestCase
TestProtocolMachine.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,  # tests are deterministic (ARCHITECTURE rule 7)
    suppress_health_check=[HealthCheck.too_slow],
)
