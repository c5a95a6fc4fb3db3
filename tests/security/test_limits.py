"""Issue 8, section 3: the [limits] table, the connection gate, DMA limits, unix: unlink."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import trio
from _limits_support import TWO_GUESTS, raw_guest, worst_latency

import pcifront
from pciback.config import ResourceLimits, parse_config
from pciback.testing import TEST_TOKEN, running_backend
from shared.errors import ConfigFileError, ErrorCode
from shared.protocol import DmaMapRequest, ErrorReply, ValueReply
from shared.transport import TransportOptions, open_listener

DROP_WITHIN = 10.0
LATENCY_BOUND = 1.0


def limits(**values: object) -> str:
    body = "\n".join(f"{key} = {value!r}" for key, value in values.items())
    return f"[limits]\n{body}\n{TWO_GUESTS}"


# --------------------------------------------------------------------------- the table


def test_every_limit_has_a_safe_default_and_is_configurable() -> None:
    config = parse_config(TWO_GUESTS)
    assert config.resources == ResourceLimits()
    tuned = parse_config(
        limits(max_connections=10, partial_frame_timeout=2.5, max_fds_per_connection=3)
    )
    assert tuned.resources.max_connections == 10
    assert tuned.resources.partial_frame_timeout == 2.5
    assert tuned.resources.max_fds_per_connection == 3
    assert tuned.limits.max_message_size == 65536  # the protocol's keys live beside them


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (limits(max_connection=3), "unknown key 'max_connection'"),
        (limits(max_connections=0), "limits.max_connections: 0 must be positive"),
        (limits(partial_frame_timeout="soon"), "expected a number"),
        (limits(max_fds_per_connection=1.5), "expected an integer"),
        (limits(max_connections=2, max_connections_per_guest=3), "larger than"),
        (
            limits(max_message_size=1 << 20, max_buffered_per_connection=1 << 19),
            r"must be at least limits\.max_message_size \+ 4",
        ),
        (
            "[interrupts]\nburst = 5\n" + limits(notification_burst=5),
            "the same setting",
        ),
    ],
)
def test_bad_limits_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigFileError, match=message):
        parse_config(text)


def test_interrupts_table_is_the_older_spelling() -> None:
    config = parse_config("[interrupts]\nmax_events_per_second = 10.0\nburst = 5\n" + TWO_GUESTS)
    assert config.resources.notifications_per_second == 10.0
    assert config.resources.notification_burst == 5


# --------------------------------------------------------------------------- connections


async def test_connections_per_guest_are_capped(tmp_path: Path) -> None:
    config = limits(max_connections_per_guest=2)
    async with (
        running_backend(config, transports=("unix",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("unix"), guest="victim", token=TEST_TOKEN) as victim,
        pcifront.connect(rb.address("unix"), guest="mallory", token=TEST_TOKEN),
        pcifront.connect(rb.address("unix"), guest="mallory", token=TEST_TOKEN),
    ):
        with pytest.raises(pcifront.HandshakeError) as info:
            async with pcifront.connect(rb.address("unix"), guest="mallory", token=TEST_TOKEN):
                pass
        assert info.value.code is ErrorCode.BUSY
        assert "max_connections_per_guest" in str(info.value)
        assert rb.backend.stats.limits_exceeded["max_connections_per_guest"] == 1
        assert await worst_latency(victim) < LATENCY_BOUND
        # The refused connection gave its place back: the victim may still open a second.
        async with pcifront.connect(rb.address("unix"), guest="victim", token=TEST_TOKEN):
            pass


async def test_connections_in_total_are_capped(tmp_path: Path) -> None:
    config = limits(max_connections=3, max_connections_per_guest=3)
    async with (
        running_backend(config, transports=("tcp",), tmp=tmp_path) as rb,
        pcifront.connect(rb.address("tcp"), guest="victim", token=TEST_TOKEN) as victim,
    ):
        host, port = rb.address("tcp").removeprefix("tcp://").rsplit(":", 1)
        idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(3)]
        try:
            with trio.fail_after(DROP_WITHIN):
                assert await idle[2].receive_some(1) == b""  # closed at once
            assert rb.backend.stats.limits_exceeded["max_connections"] >= 1
            assert await worst_latency(victim) < LATENCY_BOUND
        finally:
            for stream in idle:
                await trio.aclose_forcefully(stream)


async def test_unauthenticated_connections_per_source_are_capped(tmp_path: Path) -> None:
    config = limits(max_unauthenticated_per_source=2)
    async with running_backend(config, transports=("unix",), tmp=tmp_path) as rb:
        path = rb.address("unix").split(":", 1)[1]
        silent = []
        try:
            for _ in range(3):
                stream = await trio.open_unix_socket(path)
                silent.append(stream)
            with trio.fail_after(DROP_WITHIN):
                assert await silent[2].receive_some(1) == b""
            assert rb.backend.stats.limits_exceeded["max_unauthenticated_per_source"] == 1
        finally:
            for stream in silent:
                await trio.aclose_forcefully(stream)
        # Once they are gone the same source may connect again.
        async with pcifront.connect(rb.address("unix"), guest="victim", token=TEST_TOKEN) as bus:
            assert await worst_latency(bus) < LATENCY_BOUND


@pytest.mark.parametrize("kind", ["unix", "shm", "tcp"])
async def test_a_silent_connection_is_dropped_after_the_handshake_time_out(
    kind: str, tmp_path: Path
) -> None:
    config = limits(handshake_timeout=0.2)
    async with running_backend(config, transports=(kind,), tmp=tmp_path) as rb:
        address = rb.address(kind)
        if kind == "tcp":
            host, port = address.removeprefix("tcp://").rsplit(":", 1)
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, int(port))
        else:
            stream = await trio.open_unix_socket(address.split(":", 1)[1])
        async with stream:
            with trio.fail_after(DROP_WITHIN):
                assert await stream.receive_some(1) == b""
        assert rb.backend.stats.limits_exceeded["handshake_timeout"] == 1


async def test_a_huge_frame_before_the_handshake_is_refused_unread(tmp_path: Path) -> None:
    async with running_backend(TWO_GUESTS, transports=("tcp",), tmp=tmp_path) as rb:
        host, port = rb.address("tcp").removeprefix("tcp://").rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            # 17 KiB announced: over max_handshake_bytes (16 KiB), under max_message_size.
            await stream.send_all(struct.pack("<I", 17 * 1024))
            with trio.fail_after(DROP_WITHIN):
                assert await stream.receive_some(1) == b""
        assert rb.backend.stats.disconnects_for_misbehaviour == 1


# --------------------------------------------------------------------------- DMA


async def test_dma_windows_and_bytes_per_guest_are_capped(tmp_path: Path) -> None:
    config = limits(max_dma_windows_per_guest=2, max_dma_bytes_per_guest=3 * 4096)
    async with (
        running_backend(config, transports=("unix",), tmp=tmp_path) as rb,
        raw_guest(rb.address("unix"), "mallory") as g,
    ):
        first = await g.request(lambda rid: DmaMapRequest(rid, 4096))
        assert isinstance(first, ValueReply)
        too_big = await g.request(lambda rid: DmaMapRequest(rid, 3 * 4096))
        assert isinstance(too_big, ErrorReply) and too_big.code is ErrorCode.BUSY
        assert "max_dma_bytes_per_guest" in too_big.message
        second = await g.request(lambda rid: DmaMapRequest(rid, 4096))
        assert isinstance(second, ValueReply)
        third = await g.request(lambda rid: DmaMapRequest(rid, 4096))
        assert isinstance(third, ErrorReply) and third.code is ErrorCode.BUSY
        assert "max_dma_windows_per_guest" in third.message
        exceeded = rb.backend.stats.limits_exceeded
        assert exceeded["max_dma_bytes_per_guest"] == exceeded["max_dma_windows_per_guest"] == 1


# --------------------------------------------------------------------------- unix: unlink


async def test_unix_listener_close_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = tmp_path / "pciback.sock"
    first = await open_listener(f"unix:{path}", TransportOptions())
    # A successor found the path, replaced it and bound its own socket there.
    os.unlink(path)
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    successor.bind(str(path))
    successor.listen(1)
    try:
        await first.aclose()
        assert path.exists()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))  # still the successor's, and it still answers
        probe.close()
    finally:
        successor.close()
    # Our own socket file is still removed on close.
    own = await open_listener(f"unix:{tmp_path / 'own.sock'}", TransportOptions())
    await own.aclose()
    assert not (tmp_path / "own.sock").exists()
