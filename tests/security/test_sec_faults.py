"""The fault loop: ``kill -9`` a real frontend at a random point of its write stream.

Each round starts ``_victim.py`` (a pcifront process holding edu1's MSI
interrupt through an eventfd and a shared 64 KiB DMA window, streaming writes,
DMA and interrupts), waits until it is streaming, lets it run for a random
time, and kills it with SIGKILL. Then:

* the device is released: no interrupt binding, no DMA window, no session of
  guest1 left, and a new connection takes interrupts and a window at once;
* the next owner reads the device's initial state, by content (XSA-306): the
  whole guest-visible config space as it was before the first round (MSI
  disabled, Command and interrupt line as firmware left them), edu's liveness
  register (not the complement of the victim's mark) and the first bytes of
  its DMA buffer (zero, not what the victim's transfers put there);
* nothing leaked: the backend's fd count and its memfd mappings are back to
  what they were before the round;
* the counters add up: every accepted connection ended, every window mapped
  was unmapped, every interrupt binding made was released.

``SEC_FAULT_ROUNDS`` (default 3 in ``make test``) and ``SEC_FAULT_SEED`` control
the loop; the seed is printed so a failing round can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import trio
from _hostile import guest_token
from conftest import REPO, BackendProcess

import pcifront

HERE = Path(__file__).resolve().parent
ROUNDS = int(os.environ.get("SEC_FAULT_ROUNDS", "3"))
#: How long the backend gets to notice a death and release everything (generous).
RELEASE_SECONDS = 10.0
EDU = 0x11E8


async def _until(check, what: str, backend: BackendProcess) -> None:
    deadline = trio.current_time() + RELEASE_SECONDS
    while True:
        problem = check()
        if problem is None:
            return
        if trio.current_time() > deadline:
            raise AssertionError(f"{what}: {problem}\n{backend.log_tail()}")
        await trio.sleep(0.05)


def _released(backend: BackendProcess) -> str | None:
    stats = backend.stats()
    if any(s["guest"] == "guest1" for s in stats["sessions"]):
        return "guest1 still has a session"
    if stats["irq"]["bindings"]["edu1"]["guest"] is not None:
        return "edu1's interrupt is still bound"
    if stats["dma"].get("guest1", {}).get("windows", 0):
        return f"guest1 still has {stats['dma']['guest1']['windows']} DMA window(s)"
    return None


#: edu BAR0: the liveness register (reads the complement of the last write: ~0 after a
#: reset) and the start of the DMA buffer the victim's transfers fill.
LIVENESS, EDU_BUFFER, BUFFER_CHECKED = 0x04, 0x40000, 64


async def _initial_state(edu: pcifront.Device) -> tuple[bytes, int, bytes]:
    """What the next owner must read: the config space, liveness, the DMA buffer's start."""
    config = b"".join(
        [(await edu.config_read(offset, 4)).to_bytes(4, "little") for offset in range(0, 256, 4)]
    )
    buffer = b"".join(
        [
            (await edu.bar_read(0, EDU_BUFFER + offset, 8)).to_bytes(8, "little")
            for offset in range(0, BUFFER_CHECKED, 8)
        ]
    )
    return config, await edu.bar_read(0, LIVENESS, 4), buffer


async def _baseline(backend: BackendProcess) -> tuple[bytes, int, bytes]:
    async with pcifront.connect(
        backend.address("unix"), guest="guest1", token=guest_token("guest1"), timeout=5
    ) as bus:
        edu = next(d for d in bus.devices if d.device_id == EDU)
        return await _initial_state(edu)


async def _take_again(
    backend: BackendProcess, kind: str, initial: tuple[bytes, int, bytes], what: str
) -> None:
    """The next owner reads the initial state, then takes interrupts and a DMA window at once."""
    async with pcifront.connect(
        backend.address(kind), guest="guest1", token=guest_token("guest1"), timeout=5
    ) as bus:
        edu = next(d for d in bus.devices if d.device_id == EDU)
        config, liveness, buffer = await _initial_state(edu)
        assert liveness == initial[1] == 0xFFFFFFFF, f"{what}: liveness {liveness:#x} leaked"
        assert buffer == initial[2] == bytes(BUFFER_CHECKED), f"{what}: DMA buffer {buffer!r}"
        changed = [hex(o) for o in range(0, 256, 4) if config[o : o + 4] != initial[0][o : o + 4]]
        assert not changed, f"{what}: config dwords {changed} differ from the initial state"
        await edu.config_write(0x04, 2, 0x6)
        async with edu.interrupts(mode="msi", vectors=1) as irqs:
            assert irqs.vectors == 1
            async with await bus.dma_map(4096) as buf:
                buf.write(0, b"taken again")


async def _start_victim(address: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    victim = subprocess.Popen(
        [sys.executable, str(HERE / "_victim.py"), address, guest_token("guest1").decode()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert victim.stdout is not None
    line = await trio.to_thread.run_sync(victim.stdout.readline)
    if line.strip() != b"ready":
        victim.kill()
        _, err = victim.communicate()
        raise AssertionError(f"victim did not start: {line!r}\n{err.decode()[-3000:]}")
    return victim


async def test_kill_minus_9_fault_loop(backend: BackendProcess) -> None:
    seed = int(os.environ.get("SEC_FAULT_SEED", random.randrange(2**32)))
    print(f"fault loop: {ROUNDS} rounds, seed {seed} (SEC_FAULT_SEED={seed} replays it)")
    rng = random.Random(seed)
    initial = await _baseline(backend)
    await _until(lambda: _released(backend), "the baseline connection's release", backend)
    start = backend.stats()
    fds, memfds = backend.fds(), backend.memfd_maps()
    for round_no in range(ROUNDS):
        kind = ("unix", "shm")[round_no % 2]
        victim = await _start_victim(backend.address(kind))
        delay = rng.uniform(0.0, 0.5)
        try:
            await trio.sleep(delay)  # a random point of the write stream
            assert victim.poll() is None, victim.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        finally:
            os.kill(victim.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(victim.wait)
            victim.stdout.close()  # type: ignore[union-attr]
            victim.stderr.close()  # type: ignore[union-attr]
        what = f"round {round_no} ({kind}, killed after {delay:.3f} s, seed {seed})"
        await _until(lambda: _released(backend), f"{what}: device not released", backend)
        await _take_again(backend, kind, initial, what)
        await _until(lambda: _released(backend), f"{what}: not released after reuse", backend)
        await _until(
            lambda: None
            if backend.fds() <= fds
            else f"{backend.fds()} fds, {fds} before: {backend.fd_targets()}",
            f"{what}: fd leak",
            backend,
        )
        await _until(
            lambda: None
            if backend.memfd_maps() <= memfds
            else f"{backend.memfd_maps()} memfd mappings, {memfds} before",
            f"{what}: shared-memory leak",
            backend,
        )
    end = backend.stats()
    accepted = end["backend"]["connections_accepted"] - start["backend"]["connections_accepted"]
    assert accepted == 2 * ROUNDS, (accepted, ROUNDS)  # one victim and one re-take per round
    assert end["backend"]["connections_active"] == start["backend"]["connections_active"]
    dma0, dma1 = start["dma"].get("guest1", {}), end["dma"]["guest1"]
    maps = dma1["maps"] - dma0.get("maps", 0)
    unmaps = dma1["unmaps"] - dma0.get("unmaps", 0)
    assert maps == 2 * ROUNDS, (maps, ROUNDS)
    assert unmaps == maps, f"{maps} windows mapped, {unmaps} unmapped"
    irq0, irq1 = start["irq"], end["irq"]
    assert irq1["enables"] - irq0["enables"] == 2 * ROUNDS
    assert backend.alive()
