"""``connect(..., reconnect=True)``: backend restarts, retried reads, writes never replayed."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

import pcifront
from pciback.config import BackendConfig, GuestConfig
from pciback.service import Backend
from pciback.testing._kit import make_test_config
from tests.support.configs import edu_config, listen_line
from tests.support.serve import TIMEOUT, ServeProcess

CONFIG = edu_config(["alpha"], {"edu0": "alpha", "edu1": None})

EDU_ID = 0x11E81234
LIVENESS = 0x04  # edu BAR0 register: reads back the inverse of the last value written


class Restartable:
    """A backend on a fixed address that the test can kill and start again."""

    def __init__(self, nursery: trio.Nursery, config: BackendConfig) -> None:
        self.nursery = nursery
        self.config = config
        self.address = config.listen[0]
        self.backend: Backend | None = None
        self._scope: trio.CancelScope | None = None

    async def start(self, config: BackendConfig | None = None) -> Backend:
        backend = Backend(config or self.config)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            with scope:
                await backend.serve(task_status=task_status)

        await self.nursery.start(run)
        self.backend, self._scope = backend, scope
        return backend

    async def kill(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await trio.testing.wait_all_tasks_blocked()


def fast_policy(links: list[pcifront.LinkEvent]) -> pcifront.ReconnectPolicy:
    return pcifront.ReconnectPolicy(initial_delay=0.05, max_delay=0.4, on_link=links.append)


@pytest.fixture
def config() -> BackendConfig:
    return make_test_config(CONFIG, transports=("memory",), tmp=None)


@pytest.fixture
async def server(nursery: trio.Nursery, config: BackendConfig) -> Restartable:
    """``config``'s backend, started (in the test's nursery, cancelled when the test ends)."""
    server = Restartable(nursery, config)
    await server.start()
    return server


async def test_a_read_made_while_the_backend_is_down_waits_and_succeeds(
    autojump_clock: trio.testing.MockClock, server: Restartable, nursery: trio.Nursery
) -> None:
    links: list[pcifront.LinkEvent] = []
    async with pcifront.connect(
        server.address, guest="alpha", reconnect=fast_policy(links)
    ) as bus:
        dev = bus.devices[0]
        await server.kill()
        assert not bus.connected
        assert [e.state for e in links] == ["down"]
        result: list[int] = []
        done = trio.Event()

        async def read() -> None:
            result.append(await dev.config_read(0, 4))
            done.set()

        nursery.start_soon(read)
        await trio.sleep(1.0)  # several back-off attempts find nobody
        assert result == []
        await server.start()
        await done.wait()
        assert result == [EDU_ID]
        assert [e.state for e in links] == ["down", "up"] and links[1].attempt > 1
        assert bus.statistics().reconnects == 1
        # Re-enumerated: the device is the same, so it keeps its Device object.
        assert bus.devices == [dev] and not dev.removed


async def test_a_write_whose_reply_was_lost_raises_outcome_unknown_and_is_not_replayed(
    autojump_clock: trio.testing.MockClock, server: Restartable, nursery: trio.Nursery
) -> None:
    links: list[pcifront.LinkEvent] = []
    backend = server.backend
    assert backend is not None
    async with pcifront.connect(
        server.address, guest="alpha", reconnect=fast_policy(links)
    ) as bus:
        dev = bus.devices[0]
        lock = backend.registry.get("edu0").lock
        outcome: list[BaseException] = []
        read_back: list[int] = []
        read_done = trio.Event()

        async def write() -> None:
            try:
                await dev.bar_write(0, LIVENESS, 4, 0x5A5A5A5A)
            except pcifront.ConnectionLostError as exc:
                outcome.append(exc)

        async def read() -> None:
            read_back.append(await dev.bar_read(0, LIVENESS, 4))
            read_done.set()

        # The backend receives both and waits for the device; then it dies.
        await lock.acquire()
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await server.kill()
        lock.release()
        (error,) = outcome
        assert isinstance(error, pcifront.OutcomeUnknownError)
        assert error.request_sent is True
        assert "not replayed" in str(error)
        # The read is retried on the new backend. Had the write been replayed,
        # the liveness register would read back ~0x5A5A5A5A.
        backend2 = await server.start()
        await read_done.wait()
        assert read_back == [0xFFFFFFFF]
        assert backend2.registry.get("edu0").provider.bar_read(0, LIVENESS, 4) == 0xFFFFFFFF
        # And a write made on the new connection goes through normally.
        await dev.bar_write(0, LIVENESS, 4, 1)
        assert await dev.bar_read(0, LIVENESS, 4) == 0xFFFFFFFE


async def test_reenumeration_reports_the_devices_that_changed(
    autojump_clock: trio.testing.MockClock, server: Restartable, config: BackendConfig
) -> None:
    links: list[pcifront.LinkEvent] = []
    both = replace(config, devices=tuple(replace(d, guest="alpha") for d in config.devices))
    async with pcifront.connect(
        server.address, guest="alpha", reconnect=fast_policy(links)
    ) as bus:
        first = bus.devices[0]
        changes = bus.changes()
        reason = "re-enumerated after reconnecting"
        # Restarted with edu1 assigned as well: one device more.
        await server.kill()
        await server.start(both)
        added = await changes.__anext__()
        assert (added.kind, added.address, added.reason) == (
            pcifront.ChangeKind.ADDED, "0000:00:01.0", reason
        )
        assert bus.devices == [first, added.device]
        assert await added.device.config_read(0, 4) == EDU_ID
        # Restarted with the original config again: that device is gone.
        await server.kill()
        await server.start()
        removed = await changes.__anext__()
        assert (removed.kind, removed.device, removed.reason) == (
            pcifront.ChangeKind.REMOVED, added.device, reason
        )
        assert bus.devices == [first]
        with pytest.raises(pcifront.DeviceRemovedError):
            await added.device.config_read(0, 4)
        assert [e.state for e in links] == ["down", "up", "down", "up"]


async def test_a_backend_that_refuses_the_guest_after_a_restart_ends_the_retries(
    autojump_clock: trio.testing.MockClock, server: Restartable, config: BackendConfig
) -> None:
    links: list[pcifront.LinkEvent] = []
    async with pcifront.connect(
        server.address, guest="alpha", reconnect=fast_policy(links)
    ) as bus:
        changes = bus.changes()
        await server.kill()
        other = replace(
            config,
            guests={"beta": GuestConfig("beta", False)},
            devices=tuple(replace(d, guest=None) for d in config.devices),
        )
        await server.start(other)
        with pytest.raises(pcifront.ConnectionLostError, match="UNKNOWN_GUEST"):
            await changes.__anext__()
        with pytest.raises(pcifront.ConnectionLostError, match="UNKNOWN_GUEST"):
            await bus.devices[0].config_read(0, 4)
        assert [e.state for e in links] == ["down", "failed"]


async def test_without_reconnect_a_lost_connection_ends_changes_and_wait_changed(
    server: Restartable,
) -> None:
    async with pcifront.connect(server.address, guest="alpha") as bus:
        changes = bus.changes()
        await server.kill()
        with pytest.raises(pcifront.ConnectionLostError):
            await changes.__anext__()
        with pytest.raises(pcifront.ConnectionLostError):
            await bus.wait_changed()
        with pytest.raises(pcifront.ConnectionLostError) as info:
            await bus.devices[0].config_read(0, 4)
        assert not isinstance(info.value, pcifront.OutcomeUnknownError)
        assert info.value.request_sent is False


async def test_changes_end_when_the_guest_closes_the_bus(server: Restartable) -> None:
    async with pcifront.connect(server.address, guest="alpha", reconnect=True) as bus:
        changes = bus.changes()
    assert [c async for c in changes] == []


def test_policy_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = pcifront.ReconnectPolicy(initial_delay=0.1, max_delay=1.0, factor=2.0)
    assert policy.delays() == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="initial_delay"):
        pcifront.ReconnectPolicy(initial_delay=0)


# --------------------------------------------------------------------------- interrupts and DMA

IRQ_RAISE, IRQ_ACK, IRQ_DMA = 0x60, 0x64, 0x100
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_TO_DEVICE_WITH_IRQ = 0x05  # start, RAM -> edu, raise an interrupt when done
EDU_BUFFER = 0x40000


async def test_interrupt_waiters_and_dma_buffers_fail_loudly_when_the_connection_is_lost(
    autojump_clock: trio.testing.MockClock, server: Restartable, nursery: trio.Nursery
) -> None:
    """In-band interrupts and message DMA (memory:): the lost session's state ends loudly."""
    links: list[pcifront.LinkEvent] = []
    async with pcifront.connect(
        server.address, guest="alpha", reconnect=fast_policy(links)
    ) as bus:
        dev = bus.devices[0]
        errors: list[BaseException] = []
        async with dev.interrupts(mode="intx") as irqs:
            buf = await bus.dma_map(4096)
            assert irqs.delivery == "inband" and not buf.shared

            async def wait() -> None:
                try:
                    await irqs.receive()
                except pcifront.ConnectionLostError as exc:
                    errors.append(exc)

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await server.kill()
            (error,) = errors
            assert isinstance(error, pcifront.ResourceLostError)
            assert "enter interrupts() again" in str(error)
            with pytest.raises(pcifront.ResourceLostError, match=r"bus\.dma_map\(\)"):
                buf.write(0, b"x")
            await server.start()
            await buf.unmap()  # a no-op: nothing is mapped any more
            assert await dev.config_read(0, 4) == EDU_ID  # connected again
        # Leaving the dead block sent nothing: a new block enables at once.
        async with dev.interrupts(mode="intx") as again:
            await dev.bar_write(0, IRQ_RAISE, 4, 1)
            assert (await again.receive()).vector == 0


def _backend_process(tmp: Path) -> ServeProcess:
    """``pciback serve`` as a real process on a fixed unix: socket (eventfds, shared DMA)."""
    config = listen_line(f"unix:{tmp / 'pciback.sock'}") + edu_config(["alpha"], {"edu0": "alpha"})
    return ServeProcess(tmp, config=config)


@pytest.mark.slow
async def test_msi_and_shared_dma_across_a_kill_9_of_a_real_backend(tmp_path: Path) -> None:
    """Eventfd MSI and memfd DMA: waiters fail at once, then re-enabled they work again."""
    up = trio.Event()

    def on_link(event: pcifront.LinkEvent) -> None:
        if event.state == "up":
            up.set()

    policy = pcifront.ReconnectPolicy(initial_delay=0.05, max_delay=0.5, on_link=on_link)
    backends = [await _backend_process(tmp_path).aready()]
    try:
        async with pcifront.connect(
            backends[0].address("unix"), guest="alpha", reconnect=policy, timeout=TIMEOUT
        ) as bus, trio.open_nursery() as nursery:
            edu = bus.devices[0]
            await edu.config_write(0x04, 2, 0x6)  # memory decode and bus master
            lost: list[BaseException] = []
            entered, leave, left = trio.Event(), trio.Event(), trio.Event()
            blocks: list[pcifront.Interrupts] = []

            async def old_block() -> None:
                # The guest's old interrupts() block: open until after the reconnect.
                async with edu.interrupts(mode="msi", vectors=1) as old:
                    blocks.append(old)
                    entered.set()
                    await leave.wait()
                left.set()

            async def receive() -> None:
                try:
                    await blocks[0].receive()
                except pcifront.ConnectionLostError as exc:
                    lost.append(exc)

            async def iterate() -> None:
                try:
                    async for _ in blocks[0]:
                        pass
                except pcifront.ConnectionLostError as exc:
                    lost.append(exc)  # not a silent StopAsyncIteration

            nursery.start_soon(old_block)
            await entered.wait()
            old = blocks[0]
            buf = await bus.dma_map(4096)
            assert old.delivery == "eventfd" and buf.shared
            await edu.bar_write(0, IRQ_RAISE, 4, 1)
            assert (await old.receive()).vector == 0  # live before the kill
            await edu.bar_write(0, IRQ_ACK, 4, 1)

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(receive)
                    waiters.start_soon(iterate)
                    await trio.testing.wait_all_tasks_blocked()
                    assert await backends[0].astop(signal.SIGKILL) == -signal.SIGKILL
            assert [type(e) for e in lost] == [pcifront.ResourceLostError] * 2
            assert "interrupts() block is dead" in str(lost[0])
            with pytest.raises(pcifront.ResourceLostError, match="map a new buffer"):
                buf.read(0, 4)
            with pytest.raises(pcifront.ResourceLostError):
                await old.eoi(0)

            backends.append(await _backend_process(tmp_path).aready())
            with trio.fail_after(TIMEOUT):
                await up.wait()
            # The new backend has a freshly reset device: the driver sets it up again.
            await edu.config_write(0x04, 2, 0x6)
            async with edu.interrupts(mode="msi", vectors=1) as irqs:
                # Leaving the dead block now must not disable the new one.
                leave.set()
                await left.wait()
                async with await bus.dma_map(4096) as fresh:
                    fresh.write(0, b"after the kill!!")
                    await edu.bar_write(0, DMA_SRC, 8, fresh.bus_address)
                    await edu.bar_write(0, DMA_DST, 8, EDU_BUFFER)
                    await edu.bar_write(0, DMA_COUNT, 8, 16)
                    await edu.bar_write(0, DMA_CMD, 8, DMA_TO_DEVICE_WITH_IRQ)
                    with trio.fail_after(TIMEOUT):
                        assert (await irqs.receive()).vector == 0
                    await edu.bar_write(0, IRQ_ACK, 4, IRQ_DMA)
                    copied = await edu.bar_read(0, EDU_BUFFER, 8)
                    assert copied.to_bytes(8, "little") == b"after th"
            assert bus.statistics().reconnects == 1
    finally:
        for backend in backends:
            backend.stop(signal.SIGKILL)  # already dead, or at the end of the test
