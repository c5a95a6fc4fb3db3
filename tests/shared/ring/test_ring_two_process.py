"""Two processes over a real memfd and real eventfds: cross-process atomics and doorbells."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest
import trio

from shared.evtchn import EventfdPort
from shared.ring import (
    CLIENT_TO_SERVER,
    SERVER_TO_CLIENT,
    RingConsumer,
    RingFullError,
    RingProducer,
    ShmLayout,
)

ROOT = Path(__file__).resolve().parents[3]

# The peer: consumes ring 0, answers each frame reversed on ring 1, stops on b"quit".
PEER = r"""
import mmap, sys, trio
from shared.evtchn import EventfdPort
from shared.ring import ShmLayout, RingConsumer, RingProducer, RingFullError

memfd, to_peer, to_parent, size, max_record = map(int, sys.argv[1:])
layout = ShmLayout(size, size, max_record)
mm = mmap.mmap(memfd, layout.total)
rx, tx = RingConsumer(mm, layout.ring_spec(0)), RingProducer(mm, layout.ring_spec(1))
doorbell, parent = EventfdPort(to_peer), EventfdPort(to_parent)
parent.notify()  # attached: the parent may start sending

async def main():
    while True:
        item = rx.receive_nowait()
        if item is None:
            if not rx.prepare_wait():
                await doorbell.wait()
            continue
        frame, wake = item
        if wake:
            parent.notify()
        if frame == b"quit":
            return
        while True:
            try:
                notify = tx.send_nowait(frame[::-1])
                break
            except RingFullError:
                if not tx.prepare_wait_space(len(frame)):
                    await doorbell.wait()
        if notify:
            parent.notify()

trio.run(main)
"""


@pytest.mark.slow
async def test_echo_across_processes(tmp_path: Path) -> None:
    size, max_record = 8192, 3000
    layout = ShmLayout(size, size, max_record)
    memfd = os.memfd_create("pcisplit-test")
    os.ftruncate(memfd, layout.total)
    mm = mmap.mmap(memfd, layout.total)
    layout.initialise(mm, initial_index=2**32 - 4096)  # cross 2**32 on the way
    to_peer, to_parent = EventfdPort.create(), EventfdPort.create()
    tx = RingProducer(mm, layout.ring_spec(CLIENT_TO_SERVER))
    rx = RingConsumer(mm, layout.ring_spec(SERVER_TO_CLIENT))
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    fds = [memfd, to_peer.fileno(), to_parent.fileno()]
    for fd in fds:
        os.set_inheritable(fd, True)
    frames = [bytes([i % 251]) * (i * 53 % max_record) for i in range(600)]
    received: list[bytes] = []

    async def send_all() -> None:
        for frame in [*frames, b"quit"]:
            while True:
                try:
                    notify = tx.send_nowait(frame)
                    break
                except RingFullError:
                    if not tx.prepare_wait_space(len(frame)):
                        await space.wait()
            if notify:
                to_peer.notify()

    space = trio.Event()  # replaced per wait by the receiver loop below

    async def receive_all() -> None:
        nonlocal space
        while len(received) < len(frames):
            item = rx.receive_nowait()
            if item is None:
                if not rx.prepare_wait():
                    await to_parent.wait()
                    space.set()
                    space = trio.Event()
                continue
            frame, wake = item
            if wake:
                to_peer.notify()
            received.append(frame)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(
                lambda task_status: trio.run_process(
                    [sys.executable, str(script), *map(str, fds), str(size), str(max_record)],
                    pass_fds=fds, env=env, task_status=task_status,
                )
            )
            await to_parent.wait()  # the peer attached to the (still empty) rings
            nursery.start_soon(send_all)
            await receive_all()
        assert proc.returncode == 0
    assert received == [f[::-1] for f in frames]
    tx.release()
    rx.release()
    mm.close()
    os.close(memfd)
    to_peer.close()
    to_parent.close()
