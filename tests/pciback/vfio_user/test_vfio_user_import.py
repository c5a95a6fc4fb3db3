"""Importing a device from a real vfio-user server: libvfio-user's gpio-pci-idio-16 sample.

The sample (samples/gpio-pci-idio-16.c) is vendor 0x494f, device 0x0dc8, with
BAR2 = 256 bytes of I/O ports: a write to offset 0 (pins 0-7) or 4 (pins 8-15)
counts each set bit; a read of offset 1 or 5 reports, per pin, whether its
count is a multiple of 3. It declares one INTx but never raises it itself, so
interrupts are tested by asking the server to fire it (SET_IRQS
DATA_NONE|ACTION_TRIGGER), which it does by writing the eventfd we gave it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
from _vfio_user_peer import GPIO_BAR, GPIO_BAR_SIZE, GPIO_DEVICE, GPIO_VENDOR, gpio_server

import pcifront
from pciback.devices import VfioUserClient, VfioUserDevice, VfioUserServerLost
from pciback.plane.runtime import DeviceRuntime
from pciback.testing import TEST_TOKEN, running_backend
from pcifront import cli
from shared.errors import ErrorCode, PcisplitError
from shared.protocol import vfio_user as vu
from shared.sync import FastLock


def config(socket: Path, *, with_edu: bool = False) -> str:
    text = f"""
[[guest]]
name = "guest0"
[[device]]
id = "gpio0"
kind = "vfio-user"
socket = "{socket}"
timeout = 5.0
guest = "guest0"
"""
    if with_edu:
        text += '[[device]]\nid = "edu0"\nmodel = "edu"\nguest = "guest0"\n'
    return text


def test_raw_client_reads_what_the_server_defines(tmp_path: Path) -> None:
    with gpio_server(tmp_path) as server, VfioUserClient.connect(server.socket) as client:
        assert client.server_version is not None and client.server_version.major == 0
        info = client.device_info()
        assert info.flags & vu.DEVICE_FLAG_PCI and info.num_regions >= 8
        bar = client.region_info(GPIO_BAR)
        assert bar.size == GPIO_BAR_SIZE and bar.readable and bar.writable
        assert client.region_info(vu.PCI_CONFIG_REGION).size == 256
        assert client.irq_info(vu.PCI_INTX_IRQ).count == 1
        ids = int.from_bytes(client.region_read(vu.PCI_CONFIG_REGION, 0, 4), "little")
        assert ids == GPIO_DEVICE << 16 | GPIO_VENDOR
        # Counting pins: pin 0 set once -> its count (1) is not a multiple of 3.
        assert client.region_read(GPIO_BAR, 1, 1) == b"\xff"
        client.region_write(GPIO_BAR, 0, b"\x01")
        assert client.region_read(GPIO_BAR, 1, 1) == b"\xfe"
        # Pipelined: two posted writes, then reads answered in order.
        client.region_write(GPIO_BAR, 0, b"\x01", posted=True)
        client.region_write(GPIO_BAR, 0, b"\x01", posted=True)
        replies = client.pipeline(
            [vu.RegionAccess(GPIO_BAR, 1, 1), vu.RegionAccess(GPIO_BAR, 5, 1)]
        )
        assert [r.data for r in replies if isinstance(r, vu.RegionData)] == [b"\xff", b"\xff"]


def test_an_errno_reply_is_typed_and_the_connection_goes_on(tmp_path: Path) -> None:
    with gpio_server(tmp_path) as server, VfioUserClient.connect(server.socket) as client:
        with pytest.raises(PcisplitError, match="refused REGION_READ") as info:
            client.region_read(GPIO_BAR, GPIO_BAR_SIZE, 4)  # past the region's end
        assert info.value.errno > 0  # type: ignore[attr-defined]
        assert client.lost is None
        assert client.region_read(GPIO_BAR, 5, 1) == b"\xff"


@pytest.mark.parametrize("kind", ["memory", "unix"])
async def test_guest_reads_writes_and_gets_interrupts(kind: str, tmp_path: Path) -> None:
    with gpio_server(tmp_path) as server:
        async with (
            running_backend(config(server.socket), transports=(kind,), tmp=tmp_path) as rb,
            pcifront.connect(rb.address(kind), guest="guest0", token=TEST_TOKEN) as bus,
        ):
            (gpio,) = bus.devices
            assert await gpio.config_read(0, 2) == GPIO_VENDOR
            assert await gpio.config_read(2, 2) == GPIO_DEVICE
            # Pins 8-15 through offset 4: three writes bring a pin back to a multiple of 3.
            await gpio.bar_write(GPIO_BAR, 4, 1, 0x80)
            assert await gpio.bar_read(GPIO_BAR, 5, 1) == 0x7F
            await gpio.bar_write(GPIO_BAR, 4, 1, 0x80)
            await gpio.bar_write(GPIO_BAR, 4, 1, 0x80)
            assert await gpio.bar_read(GPIO_BAR, 5, 1) == 0xFF
            provider = rb.backend.registry.get("gpio0").provider
            assert isinstance(provider, VfioUserDevice)
            async with gpio.interrupts(mode="intx") as irqs:
                for _ in range(3):
                    provider.loopback_interrupt()
                    with trio.fail_after(5):
                        irq = await irqs.receive()
                    assert irq.vector == 0
                    await irqs.eoi(irq)
            assert provider.interrupts_forwarded == 3
        assert rb.backend.registry.reset_failures == 0  # the stop's reset reached the server


async def test_lspci_shows_the_device_as_the_server_defines_it(tmp_path: Path) -> None:
    if cli.find_tool("lspci") is None:
        pytest.fail("pciutils' lspci is missing: `make install` installs it (as root)")
    with gpio_server(tmp_path) as server:
        async with running_backend(config(server.socket), tmp=tmp_path) as rb:
            args = cli.build_parser().parse_args(
                ["lspci", "--connect", rb.address("memory"), "-vvv", "-nn"]
            )
            out = await cli._lspci(args)
    assert "[494f:0dc8]" in out
    assert "Region 2: I/O ports at" in out and "[size=256]" in out
    assert "Interrupt: pin A" in out


async def test_reset_reaches_the_server_and_interrupts_still_work(tmp_path: Path) -> None:
    with gpio_server(tmp_path) as server:
        async with (
            running_backend(config(server.socket), tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), guest="guest0", token=TEST_TOKEN) as bus,
        ):
            (gpio,) = bus.devices
            served = rb.backend.registry.get("gpio0")
            provider = served.provider
            assert isinstance(provider, VfioUserDevice)
            assert rb.backend.registry.reset(served, "test")
            assert provider.lost is None
            async with gpio.interrupts(mode="intx") as irqs:
                provider.loopback_interrupt()
                with trio.fail_after(5):
                    await irqs.receive()
            assert await gpio.config_read(0, 2) == GPIO_VENDOR


async def test_a_dead_server_fails_its_device_and_nothing_else(tmp_path: Path) -> None:
    with gpio_server(tmp_path) as server:
        async with (
            running_backend(config(server.socket, with_edu=True), tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), guest="guest0", token=TEST_TOKEN) as bus,
        ):
            gpio, edu = sorted(bus.devices, key=lambda d: d.vendor_id == 0x1234)
            assert await gpio.bar_read(GPIO_BAR, 1, 1) == 0xFF
            server.process.kill()
            server.process.wait()
            with pytest.raises(pcifront.RequestError) as info:
                await gpio.bar_read(GPIO_BAR, 1, 1)
            assert info.value.code == ErrorCode.OPERATION_FAILED
            assert "vfio-user server" in str(info.value)
            with pytest.raises(pcifront.RequestError):  # and fails fast from now on
                await gpio.config_read(0, 4)
            provider = rb.backend.registry.get("gpio0").provider
            assert isinstance(provider, VfioUserDevice)
            assert isinstance(provider.lost, VfioUserServerLost)
            # The backend and the guest's other device are untouched.
            assert await edu.bar_read(0, 0x00, 4) == 0x010000ED
            await edu.bar_write(0, 0x04, 4, 0x12345678)
            assert await edu.bar_read(0, 0x04, 4) == ~0x12345678 & 0xFFFFFFFF


async def test_an_idle_device_notices_its_server_going(tmp_path: Path) -> None:
    with gpio_server(tmp_path) as server:
        async with running_backend(config(server.socket), tmp=tmp_path) as rb:
            provider = rb.backend.registry.get("gpio0").provider
            assert isinstance(provider, VfioUserDevice)
            server.process.kill()
            server.process.wait()
            # The process is reaped, so the kernel has closed its end: our socket is
            # readable (EOF) now. trio's idle check polls I/O first, so once every
            # task is blocked the device's socket watcher has seen it.
            await trio.testing.wait_all_tasks_blocked()
            assert "closed the connection" in str(provider.lost)


def test_an_unreachable_server_is_a_config_error(tmp_path: Path) -> None:
    from pciback.config import parse_config
    from pciback.plane.registry import DeviceRegistry
    from shared.errors import ConfigFileError

    cfg = parse_config(config(tmp_path / "nobody.sock"))
    with pytest.raises(ConfigFileError, match="cannot connect to the vfio-user server"):
        DeviceRegistry(cfg)


async def test_closing_a_device_leaks_no_descriptor_and_frees_the_server(tmp_path: Path) -> None:
    with gpio_server(tmp_path) as server:
        before = sorted(os.listdir("/proc/self/fd"))
        for _ in range(3):  # the sample takes the next client once one has left
            async with trio.open_nursery() as nursery:
                runtime = DeviceRuntime("gpio0", FastLock(), nursery)
                device = VfioUserDevice(server.socket)
                device.attach(runtime)  # an eventfd for INTx, and two watching tasks
                assert device.config_read(0, 2) == GPIO_VENDOR
                device.close()
                await trio.testing.wait_all_tasks_blocked()
                assert runtime.tasks_failed == 0
                nursery.cancel_scope.cancel()
        assert sorted(os.listdir("/proc/self/fd")) == before
