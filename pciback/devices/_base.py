"""The device-provider contract: what the backend service needs from any device.

Providers are emulated models, snapshot devices (from an lspci dump) and host
devices (sysfs). They answer config and BAR accesses *as the hardware would*;
the per-guest policy (``pciback.policy``) sits in front of them and decides
what a guest may see and change.

Config and BAR handlers are synchronous: they run under the service's
per-device lock, so no two accesses to one device interleave. Work that must
wait (a factorial that takes time, DMA, interrupts) goes through the
:class:`DeviceContext` the backend attaches, never through a transport.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from shared.errors import ErrorCode, PcisplitError
from shared.pci import BarKind

from ._irqstate import InterruptState

__all__ = [
    "BarKind",
    "BarSpec",
    "DeviceProvider",
    "DeviceContext",
    "InterruptSink",
    "NullInterruptSink",
    "DeviceSetupError",
    "DmaUnavailableError",
    "DmaFaultError",
]


class DeviceSetupError(PcisplitError, ValueError):
    """A device model or provider was declared inconsistently (bad BAR, capability, size...)."""

    code = ErrorCode.INVALID_STATE


class DmaUnavailableError(PcisplitError):
    """The device tried DMA but its context offers none (no guest memory windows)."""

    code = ErrorCode.NOT_IMPLEMENTED


class DmaFaultError(PcisplitError):
    """A DMA touched a bus address outside every window the guest mapped.

    Contexts raise it *after* reporting the fault to the guest; the model only
    has to abandon the transfer.
    """

    code = ErrorCode.DMA_FAULT


@dataclass(frozen=True, slots=True)
class BarSpec:
    """One implemented BAR. A 64-bit BAR occupies ``index`` and ``index + 1``."""

    index: int
    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 5:
            raise ValueError(f"BAR index {self.index} is out of range 0..5")
        if self.kind is BarKind.MEM64 and self.index == 5:
            raise ValueError("a 64-bit BAR cannot start at index 5")
        minimum = 4 if self.kind is BarKind.IO else 16
        if self.size < minimum or self.size & (self.size - 1):
            raise ValueError(
                f"BAR{self.index} size {self.size:#x} must be a power of two >= {minimum}"
            )
        if self.kind is BarKind.IO and self.prefetchable:
            raise ValueError(f"BAR{self.index}: an I/O BAR cannot be prefetchable")

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.kind is BarKind.IO:
            return 0x1
        return (0x4 if self.kind is BarKind.MEM64 else 0x0) | (0x8 if self.prefetchable else 0)


@runtime_checkable
class InterruptSink(Protocol):
    """Where a device's interrupts go. The IRQ router implements it; models never do.

    All methods are synchronous and must not block: they are called from
    register handlers that run under the device lock.
    """

    def assert_intx(self) -> None:
        """The device drives its INTx line active (level-triggered)."""

    def deassert_intx(self) -> None:
        """The device releases its INTx line."""

    def signal_msi(self, vector: int) -> None:
        """The device sends MSI message ``vector`` (0-based, < enabled vector count)."""

    def signal_msix(self, vector: int) -> None:
        """The device signals MSI-X table entry ``vector`` (0-based, < the table size)."""


class NullInterruptSink:
    """The sink of a context that delivers no interrupts: it records nothing.

    Models still track their own INTx level and interrupt status (see
    :meth:`pciback.devices.EmulatedDevice.intx_asserted`), so registers hold
    their values even before an IRQ router exists.
    """

    def assert_intx(self) -> None:
        """Ignore: nobody is listening."""

    def deassert_intx(self) -> None:
        """Ignore: nobody is listening."""

    def signal_msi(self, vector: int) -> None:
        """Ignore: nobody is listening."""

    def signal_msix(self, vector: int) -> None:
        """Ignore: nobody is listening."""


_NULL_SINK = NullInterruptSink()


class DeviceContext(abc.ABC):
    """Services the backend offers a device model: tasks, the lock, interrupts and DMA.

    Only :meth:`spawn` and :meth:`locked` are abstract. Interrupt delivery and
    DMA have defaults (deliver nothing; DMA unavailable) that contexts override
    when the backend gains an IRQ router and guest memory windows.
    """

    @abc.abstractmethod
    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``fn`` as a background task owned by the device (cancelled on reset/removal)."""

    @abc.abstractmethod
    def locked(self) -> AbstractAsyncContextManager[None]:
        """Hold the device's access lock (use from background tasks that change state)."""

    @property
    def interrupts(self) -> InterruptSink:
        """Where the device's interrupts go. The default sink delivers nothing."""
        return _NULL_SINK

    @property
    def dma_available(self) -> bool:
        """Whether :meth:`dma_read` and :meth:`dma_write` can work at all."""
        return False

    async def dma_read(self, address: int, length: int) -> bytes:
        """Read ``length`` bytes of guest memory at bus address ``address``.

        Raises :class:`DmaFaultError` when the range is outside the guest's
        windows and :class:`DmaUnavailableError` when the context has no DMA.
        """
        raise DmaUnavailableError(
            f"DMA read of {length} bytes at {address:#x} is not possible: this backend has "
            "no guest memory windows (a device served by a running backend has them)"
        )

    async def dma_write(self, address: int, data: bytes) -> None:
        """Write ``data`` to guest memory at bus address ``address`` (see :meth:`dma_read`)."""
        raise DmaUnavailableError(
            f"DMA write of {len(data)} bytes at {address:#x} is not possible: this backend has "
            "no guest memory windows (a device served by a running backend has them)"
        )


class DeviceProvider(abc.ABC):
    """Base class of every device the backend can serve."""

    #: "emulated", "snapshot" or "host".
    kind: str = "emulated"
    _interrupt_state: InterruptState | None = None

    @property
    def interrupt_state(self) -> InterruptState:
        """The device's one :class:`InterruptState` (modes, masks, pending bits, INTx).

        Created on first use. The model's capability registers, the guest's
        policy and the IRQ router all read and change this object; a reset of
        the device returns it to power-on.
        """
        state = self._interrupt_state
        if state is None:
            state = self._interrupt_state = InterruptState()
        return state

    def signal_unmasked(self, mode: int, vectors: int) -> None:  # noqa: B027
        """Software unmasked pending vectors through config space (bit per vector): send them.

        Called only while no IRQ router manages the device (a router delivers
        what its own operations unmask). The default sends nothing: the
        provider has no interrupt sink.
        """

    @property
    @abc.abstractmethod
    def config_size(self) -> int:
        """64, 256 or 4096."""

    @abc.abstractmethod
    def config_read(self, offset: int, size: int) -> int:
        """An aligned 1/2/4-byte config read, as the hardware answers it."""

    @abc.abstractmethod
    def config_write(self, offset: int, size: int, value: int) -> None:
        """An aligned 1/2/4-byte config write, with the hardware's register semantics."""

    @abc.abstractmethod
    def bars(self) -> list[BarSpec]:
        """The implemented BARs (sizes and kinds)."""

    def rom_size(self) -> int:
        """Expansion ROM size in bytes, 0 when there is none."""
        return 0

    def firmware_addresses(self) -> dict[int, int]:
        """Addresses firmware must keep: resource index (0-5, 6 for the ROM) -> address.

        Empty by default: firmware places every BAR in the guest's windows.
        A snapshot keeps the addresses its dump programmed where no size was
        given for them.
        """
        return {}

    @abc.abstractmethod
    def bar_read(self, bar: int, offset: int, size: int) -> int:
        """Read 1/2/4/8 bytes at ``offset`` inside BAR ``bar``."""

    @abc.abstractmethod
    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """Write 1/2/4/8 bytes at ``offset`` inside BAR ``bar``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Return the device to its power-on state."""

    def attach(self, ctx: DeviceContext) -> None:  # noqa: B027
        """Called once when the backend starts serving the device."""

    def config_image(self) -> bytes:
        """The whole config space as the hardware answers it (for snapshots)."""
        return b"".join(
            self.config_read(off, 4).to_bytes(4, "little") for off in range(0, self.config_size, 4)
        )
