"""MSI and MSI-X from an imported device: the guest's mode decides which eventfds the server holds.

libvfio-user's gpio sample has INTx only, so this runs against the server
written in ``_vfio_user_scripted`` (MSI and MSI-X with 4 vectors each; it fires
the eventfds it holds when asked, as libvfio-user does).
"""

from __future__ import annotations

from pathlib import Path

import trio
from _vfio_user_scripted import listening

import pcifront
from pciback.devices import VfioUserDevice
from pciback.testing import TEST_TOKEN, running_backend
from shared.protocol import vfio_user as vu


def config(socket: Path) -> str:
    return f"""
[[guest]]
name = "guest0"
[[device]]
id = "dev0"
kind = "vfio-user"
socket = "{socket}"
guest = "guest0"
"""


async def test_msi_vectors_reach_the_guest_and_intx_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "msi.sock"
    with listening(path, msi=True, intx=True) as servers:
        async with (
            running_backend(config(path), tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), guest="guest0", token=TEST_TOKEN) as bus,
        ):
            (dev,) = bus.devices
            (server,) = servers
            provider = rb.backend.registry.get("dev0").provider
            assert isinstance(provider, VfioUserDevice)
            assert set(server.eventfds[vu.PCI_INTX_IRQ]) == {0}  # INTx armed from the start
            async with dev.interrupts(mode="msi", vectors=2) as irqs:
                # MSI on: INTx disarmed, one eventfd per enabled vector.
                assert server.eventfds[vu.PCI_INTX_IRQ] == {}
                assert set(server.eventfds[vu.PCI_MSI_IRQ]) == {0, 1}
                for vector in (1, 0, 1):
                    provider.loopback_interrupt(vu.PCI_MSI_IRQ, vector)
                    with trio.fail_after(5):
                        irq = await irqs.receive()
                    assert irq.vector == vector
            # MSI off: its eventfds are taken back and INTx is armed again.
            assert server.eventfds[vu.PCI_MSI_IRQ] == {}
            assert set(server.eventfds[vu.PCI_INTX_IRQ]) == {0}
            async with dev.interrupts(mode="intx") as irqs:
                provider.loopback_interrupt()
                with trio.fail_after(5):
                    irq = await irqs.receive()
                assert irq.vector == 0
            assert provider.interrupts_forwarded == 4


async def test_reset_puts_the_server_back_on_intx(tmp_path: Path) -> None:
    path = tmp_path / "msi.sock"
    with listening(path, msi=True, intx=True) as servers:
        async with (
            running_backend(config(path), tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), guest="guest0", token=TEST_TOKEN) as bus,
        ):
            (dev,) = bus.devices
            (server,) = servers
            served = rb.backend.registry.get("dev0")
            async with dev.interrupts(mode="msi", vectors=4):
                assert set(server.eventfds[vu.PCI_MSI_IRQ]) == {0, 1, 2, 3}
                assert rb.backend.registry.reset(served, "test")
                assert server.eventfds[vu.PCI_MSI_IRQ] == {}
                assert set(server.eventfds[vu.PCI_INTX_IRQ]) == {0}
            assert rb.backend.registry.reset_failures == 0


async def test_msix_vectors_reach_the_guest(tmp_path: Path) -> None:
    path = tmp_path / "msix.sock"
    with listening(path, msi=True, intx=True) as servers:
        async with (
            running_backend(config(path), tmp=tmp_path) as rb,
            pcifront.connect(rb.address("memory"), guest="guest0", token=TEST_TOKEN) as bus,
        ):
            (dev,) = bus.devices
            (server,) = servers
            provider = rb.backend.registry.get("dev0").provider
            assert isinstance(provider, VfioUserDevice)
            async with dev.interrupts(mode="msix", vectors=4) as irqs:
                assert server.eventfds[vu.PCI_INTX_IRQ] == {}
                assert set(server.eventfds[vu.PCI_MSIX_IRQ]) == {0, 1, 2, 3}
                for vector in (3, 0):
                    provider.loopback_interrupt(vu.PCI_MSIX_IRQ, vector)
                    with trio.fail_after(5):
                        irq = await irqs.receive()
                    assert irq.vector == vector
            assert server.eventfds[vu.PCI_MSIX_IRQ] == {}
            assert set(server.eventfds[vu.PCI_INTX_IRQ]) == {0}
