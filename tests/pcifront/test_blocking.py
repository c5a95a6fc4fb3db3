"""The blocking client against the real backend (running in a thread with its own trio loop).

Same requests, same errors, same interrupts as the trio API, on every transport
the blocking client speaks; no trio in the test's own thread.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

import pcifront
from pciback.testing import TEST_TOKEN, RunningBackend, running_backend
from pcifront import blocking
from shared.errors import ErrorCode
from shared.transport import (
    BlockingShmTransport,
    TransportAddressError,
    TransportConnectError,
    TransportOptions,
)
from tests.support.configs import edu_config
from tests.support.tls import TlsFiles

EDU_IDENT, EDU_LIVENESS, EDU_RAISE, EDU_ACK = 0x00, 0x04, 0x60, 0x64

CONFIG = TlsFiles.section + edu_config(["guest0", "guest1"], {"edu0": "guest0"})


def _tls(tmp: Path) -> ssl.SSLContext:
    """The backend's TLS files in ``tmp`` (CONFIG's [tls] names them); guest0's context."""
    return TlsFiles(tmp).client_context("guest0")


@contextmanager
def backend_in_thread(tmp: Path, kinds: tuple[str, ...]) -> Iterator[RunningBackend]:
    """The real backend, serving from its own trio loop in a thread until the block ends."""
    started = threading.Event()
    box: dict[str, object] = {"tls": _tls(tmp)}

    async def main() -> None:
        stop = trio.Event()
        box["stop"], box["token"] = stop, trio.lowlevel.current_trio_token()
        async with running_backend(CONFIG, transports=kinds, tmp=tmp) as rb:
            box["rb"] = rb
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread below
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="backend")
    thread.start()
    started.wait(30)
    try:
        if "error" in box:
            raise AssertionError(f"backend failed to start: {box['error']!r}")
        rb = box["rb"]
        assert isinstance(rb, RunningBackend)
        rb.client_tls = box["tls"]  # type: ignore[attr-defined]
        yield rb
    finally:
        if "stop" in box and "error" not in box:
            stop = box["stop"]
            assert isinstance(stop, trio.Event)
            trio.from_thread.run_sync(stop.set, trio_token=box["token"])  # type: ignore[arg-type]
        thread.join(30)
    assert "error" not in box, box.get("error")


def client_options(rb: RunningBackend, kind: str) -> TransportOptions:
    ctx = getattr(rb, "client_tls", None)
    return TransportOptions(ssl_context=ctx if kind == "tls" else None)


@pytest.mark.parametrize("kind", ["unix", "shm", "tcp", "tls"])
def test_blocking_bus_reads_writes_resets_and_interrupts(kind: str, tmp_path: Path) -> None:
    with backend_in_thread(tmp_path, (kind,)) as rb:
        opts = client_options(rb, kind)
        with blocking.connect(
            rb.address(kind), guest="guest0", options=opts, token=TEST_TOKEN
        ) as bus:
            assert bus.guest == "guest0" and "interrupts" in bus.features
            (dev,) = bus.devices
            assert isinstance(dev, blocking.Device) and bus.device(dev.address) is dev
            assert (dev.vendor_id, dev.device_id) == (0x1234, 0x11E8)
            assert dev.config_read(0, 4) == 0x11E81234
            assert dev.bar_read(0, EDU_IDENT, 4) == 0x010000ED
            dev.bar_write(0, EDU_LIVENESS, 4, 0x12345678)
            assert dev.bar_read(0, EDU_LIVENESS, 4) == 0xEDCBA987
            dev.config_write(0x04, 2, 0x0006)  # memory space and bus master on
            assert dev.config_read(0x04, 2) & 0x6 == 0x6
            dev.reset()  # bus master off again (firmware leaves memory decode on)
            assert dev.config_read(0x04, 2) & 0x4 == 0
            with pytest.raises(pcifront.InvalidAccessError, match="size must be one of"):
                dev.config_read(0, 3)  # refused before it is sent, as in the trio API
            with pytest.raises(pcifront.InvalidAccessError):
                dev.config_read(0x1000 - 2, 4)  # the backend refuses: past config space
            bus.ping()
            with dev.interrupts(mode="msi") as irqs:
                assert irqs.receive_nowait() is None
                with pytest.raises(blocking.ReceiveTimeoutError):
                    irqs.receive(timeout=0)
                for _ in range(3):
                    dev.bar_write(0, EDU_RAISE, 4, 0x1)
                total = 0
                while total < 3:
                    total += irqs.receive(timeout=10).count
                assert total == 3 and irqs.statistics().fired == 3
                with pytest.raises(pcifront.InterruptModeError, match="already has"):
                    with dev.interrupts(mode="msi"):
                        pass
            with dev.interrupts(mode="intx") as line:
                dev.bar_write(0, EDU_RAISE, 4, 0x1)
                assert line.receive(timeout=10) == pcifront.Interrupt(0, 1)
                dev.bar_write(0, EDU_ACK, 4, 0x1)
                line.eoi(0)
                assert line.statistics().eois == 1
            stats = bus.statistics()
            assert stats.requests_sent == stats.replies_received
            assert stats.stray_interrupts == 0
        with pytest.raises(pcifront.ConnectionLostError):
            dev.config_read(0, 4)  # the bus was closed by the with block


def test_blocking_shm_polling_spins_in_c(tmp_path: Path) -> None:
    with backend_in_thread(tmp_path, ("shm",)) as rb:
        with blocking.connect(rb.address("shm"), guest="guest0", poll_us=200) as bus:
            dev = bus.devices[0]
            for _ in range(50):
                assert dev.config_read(0, 2) == 0x1234
            transport = bus.transport
            assert isinstance(transport, BlockingShmTransport)
            # Replies not already on the ring were waited for by spinning first: the
            # receiver never slept on the doorbell without a spin that missed.
            assert transport.spin_hits + transport.spin_misses > 0
            assert transport.doorbell_sleeps <= transport.spin_misses


def test_blocking_handshake_refusal_and_bad_addresses(tmp_path: Path) -> None:
    with backend_in_thread(tmp_path, ("unix",)) as rb:
        with pytest.raises(pcifront.HandshakeError) as info:
            blocking.connect(rb.address("unix"), guest="nobody")
        assert info.value.code is ErrorCode.UNKNOWN_GUEST
        with blocking.connect(rb.address("unix"), guest="guest1") as bus:
            assert bus.devices == []
            with pytest.raises(pcifront.DeviceNotFoundError):
                bus.device("00:01.0")
    with pytest.raises(TransportAddressError, match="blocking client speaks"):
        blocking.connect("memory:x")
    with pytest.raises(TransportConnectError, match="cannot connect"):
        blocking.connect(f"unix:{tmp_path / 'nothing.sock'}")


def test_blocking_backend_goodbye_is_connection_lost(tmp_path: Path) -> None:
    with backend_in_thread(tmp_path, ("shm",)) as rb:
        bus = blocking.connect(rb.address("shm"), guest="guest0")
        dev = bus.devices[0]
        assert dev.config_read(0, 2) == 0x1234
    # The backend has shut down: its goodbye (or the socket's EOF) ends the connection.
    with pytest.raises(pcifront.ConnectionLostError):
        dev.config_read(0, 2)
    bus.close()
    bus.close()  # idempotent
