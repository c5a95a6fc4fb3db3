"""The state tables, and the documentation generated from them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.errors import ErrorCode, LocalProtocolError
from shared.protocol import (
    CALL_RESULT_TAGS,
    CONTROL_TAGS,
    EVENT_TAGS,
    INITIAL_STATE,
    LIVE_STATES,
    MESSAGE_TYPES,
    REPLY_TAGS,
    REQUEST_TAGS,
    TERMINAL_STATES,
    TRANSITIONS,
    ConnectionState,
    Direction,
    DmaCallResult,
    DmaReadCall,
    DmaWriteCall,
    Event,
    Message,
    MessageKind,
    Reply,
    Request,
    Role,
    message_kind,
    next_state,
    render_state_diagram,
)

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"
BEGIN = re.compile(r"<!-- state-diagram:begin[^\n]*-->\n")
END = "<!-- state-diagram:end -->"


def _doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def test_doc_embeds_the_current_state_diagram() -> None:
    text = _doc_text()
    match = BEGIN.search(text)
    assert match is not None, "docs/protocol.md lost its state-diagram:begin marker"
    embedded = text[match.end() : text.index(END)]
    assert embedded.strip() == render_state_diagram().strip(), (
        "docs/protocol.md's state diagram is stale; replace the text between the markers with "
        "the output of: python -c 'from shared.protocol import render_state_diagram as r; "
        "print(r())'"
    )


def test_doc_names_every_message_tag_and_error_code() -> None:
    text = _doc_text()
    for tag, cls in MESSAGE_TYPES.items():
        assert re.search(rf"`{tag:#04x}` \| `{cls.__name__}`", text), cls.__name__
    for code in ErrorCode:
        assert f"| {code.value} | `{code.name}` |" in text, code.name


def test_doc_example_runs() -> None:
    text = _doc_text()
    block = text[text.index("```python\n") + len("```python\n") :]
    block = block[: block.index("```")]
    namespace: dict[str, object] = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["reply"].value == 0x11E81234  # type: ignore[attr-defined]


def test_render_is_deterministic_and_covers_every_transition() -> None:
    text = render_state_diagram()
    assert text == render_state_diagram()
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) - 2 == len(TRANSITIONS)  # minus one header per role
    for role in Role:
        assert f"[*] --> {INITIAL_STATE[role].name}" in text


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
def test_every_message_has_a_kind_and_a_tag_in_its_range(cls: type[Message]) -> None:
    kind = message_kind(cls)
    expected = {
        MessageKind.REQUEST: REQUEST_TAGS,
        MessageKind.REPLY: REPLY_TAGS,
        MessageKind.EVENT: EVENT_TAGS,
        MessageKind.CALL_RESULT: CALL_RESULT_TAGS,
        MessageKind.CHANGE_ACK: CALL_RESULT_TAGS,
    }.get(kind, CONTROL_TAGS)
    assert cls.TAG in expected
    assert issubclass(cls, Request) == (kind is MessageKind.REQUEST)
    assert issubclass(cls, Reply) == (kind is MessageKind.REPLY)
    assert issubclass(cls, Event) == (kind is MessageKind.EVENT)


def test_message_kind_rejects_non_messages() -> None:
    with pytest.raises(LocalProtocolError, match="not a protocol message kind"):
        message_kind(Message)


def test_requests_flow_client_to_server_and_replies_and_events_back() -> None:
    for (role, _state, direction, kind), _target in TRANSITIONS.items():
        sender = (
            role
            if direction is Direction.SEND
            else (Role.SERVER if role is Role.CLIENT else Role.CLIENT)
        )
        if kind in (
            MessageKind.HELLO,
            MessageKind.REQUEST,
            MessageKind.CALL_RESULT,
            MessageKind.CHANGE_ACK,
        ):
            assert sender is Role.CLIENT
        if kind in (
            MessageKind.WELCOME,
            MessageKind.HANDSHAKE_REJECTED,
            MessageKind.REPLY,
            MessageKind.EVENT,
        ):
            assert sender is Role.SERVER


def test_requests_replies_and_events_only_when_open() -> None:
    for (_role, state, _direction, kind), target in TRANSITIONS.items():
        if kind in (
            MessageKind.REQUEST,
            MessageKind.REPLY,
            MessageKind.EVENT,
            MessageKind.CALL_RESULT,
            MessageKind.CHANGE_ACK,
        ):
            assert state is target is ConnectionState.OPEN


def test_terminal_states_receive_nothing_and_only_error_may_say_goodbye() -> None:
    for (_role, state, direction, kind), target in TRANSITIONS.items():
        if state in TERMINAL_STATES:
            assert (state, direction, kind, target) == (
                ConnectionState.ERROR,
                Direction.SEND,
                MessageKind.GOODBYE,
                ConnectionState.ERROR,
            )


def test_every_live_state_can_say_and_hear_goodbye() -> None:
    for role, states in LIVE_STATES.items():
        assert INITIAL_STATE[role] in states
        for state in states:
            for direction in Direction:
                assert next_state(role, state, direction, MessageKind.GOODBYE) is (
                    ConnectionState.CLOSED
                )


def test_every_live_state_is_reachable_and_can_reach_open_or_closed() -> None:
    for role in Role:
        reachable = {INITIAL_STATE[role]}
        frontier = [INITIAL_STATE[role]]
        while frontier:
            state = frontier.pop()
            for (r, s, _d, _k), target in TRANSITIONS.items():
                if r is role and s is state and target not in reachable:
                    reachable.add(target)
                    frontier.append(target)
        assert set(LIVE_STATES[role]) | {ConnectionState.CLOSED} <= reachable


def test_backend_calls_are_events_and_their_result_has_its_own_kind() -> None:
    assert message_kind(DmaReadCall) is MessageKind.EVENT
    assert message_kind(DmaWriteCall) is MessageKind.EVENT
    assert message_kind(DmaCallResult) is MessageKind.CALL_RESULT
    rows = {key for key in TRANSITIONS if key[3] is MessageKind.CALL_RESULT}
    assert rows == {
        (Role.CLIENT, ConnectionState.OPEN, Direction.SEND, MessageKind.CALL_RESULT),
        (Role.SERVER, ConnectionState.OPEN, Direction.RECEIVE, MessageKind.CALL_RESULT),
    }


def test_call_result_ranges_do_not_overlap_the_others() -> None:
    ranges = [CONTROL_TAGS, REQUEST_TAGS, REPLY_TAGS, EVENT_TAGS, CALL_RESULT_TAGS]
    seen: set[int] = set()
    for r in ranges:
        assert seen.isdisjoint(r)
        seen.update(r)
