"""The emulated-device framework: a device model built by composition.

A model declares its identity, adds BARs with read/write handlers (or a
:class:`~pciback.devices.BarRegion`), registers capabilities, and raises
interrupts; the framework gives its config space hardware semantics::

    dev = EmulatedDevice(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000)
    dev.add_bar(0, 4096, read=my_read, write=my_write)
    dev.add_msi_capability(vectors=1)

Config space follows QEMU's model: every byte has a write mask and a
write-1-to-clear mask (see ``_regfile.py``), so IDs, class, header type,
capability pointers and capability headers are read-only, Command has its
writable bits, Status has its RW1C error bits, and BAR sizing works exactly
as on hardware.

Models subclass :class:`EmulatedDevice` to keep their state, and override
:meth:`reset_state` (power-on state of the model) and, when they need to react
to config writes, :meth:`config_written`.
"""

from __future__ import annotations

from shared.errors import ConfigAccessError, ErrorCode, PcisplitError
from shared.pci import (
    CapabilityBuilder,
    CapId,
    Command,
    ConfigSpace,
    MsiControl,
    Reg,
    Status,
    check_access,
    msi_layout,
    walk_capabilities,
)
from shared.protocol import IRQ_MODE_MSI, IRQ_MODE_MSIX

from ._base import (
    BarKind,
    BarSpec,
    DeviceContext,
    DeviceProvider,
    DeviceSetupError,
    InterruptSink,
    NullInterruptSink,
)
from ._irqstate import MsiRegisters, MsixRegisters, Signal
from ._msix import MsixTableRegion, msix_capability_body
from ._regfile import RegisterFile, apply_header_masks, bar_masks, rom_mask
from ._regions import BarRegion, HandlerRegion, MemoryRegion, ReadHandler, WriteHandler

__all__ = ["EmulatedDevice"]

_NULL_SINK = NullInterruptSink()


class EmulatedDevice(DeviceProvider):
    """A device whose config space and BARs are emulated in Python.

    ``class_code`` is the 24-bit class (base class, subclass, prog-if).
    ``config_size`` is 256 for PCI or 4096 for PCIe (extended capabilities).
    ``interrupt_pin`` is 0 (none) or 1-4 (INTA-INTD).
    """

    kind = "emulated"

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
        config_size: int = 256,
        header_type: int = 0,
    ) -> None:
        for name, value, top in (
            ("vendor_id", vendor_id, 0xFFFF),
            ("device_id", device_id, 0xFFFF),
            ("class_code", class_code, 0xFF_FFFF),
            ("revision", revision, 0xFF),
            ("subsystem_vendor_id", subsystem_vendor_id, 0xFFFF),
            ("subsystem_id", subsystem_id, 0xFFFF),
            ("interrupt_pin", interrupt_pin, 4),
            ("header_type", header_type, 0xFF),
        ):
            if not isinstance(value, int) or not 0 <= value <= top:
                raise DeviceSetupError(f"{name} {value!r} is out of range 0..{top:#x}")
        if config_size not in (256, 4096):
            raise DeviceSetupError(f"config_size {config_size} must be 256 (PCI) or 4096 (PCIe)")
        if header_type & 0x7F not in (0, 1, 2):
            raise DeviceSetupError(
                f"header type {header_type:#x} is not supported; use 0 (endpoint), 1 (PCI "
                "bridge) or 2 (CardBus bridge)"
            )
        self._regs = RegisterFile(config_size)
        self._header_type = header_type
        regs = self._regs
        regs.init_int(Reg.VENDOR_ID, 2, vendor_id)
        regs.init_int(Reg.DEVICE_ID, 2, device_id)
        regs.init_int(Reg.REVISION_ID, 4, revision | (class_code << 8))
        regs.init_int(Reg.HEADER_TYPE, 1, header_type)
        if header_type & 0x7F == 0:
            regs.init_int(Reg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
            regs.init_int(Reg.SUBSYSTEM_ID, 2, subsystem_id)
        regs.init_int(Reg.INTERRUPT_PIN, 1, interrupt_pin)
        apply_header_masks(regs, header_type)
        self._bars: dict[int, tuple[BarSpec, BarRegion]] = {}
        self._rom_size = 0
        # Capabilities are laid out by shared.pci's builder on a scratch copy of the
        # power-on image; the bytes it places are then copied into the register file.
        self._caps: CapabilityBuilder | None = CapabilityBuilder(ConfigSpace(self._regs.image()))
        self._last_cap: int | None = None
        self._last_ext_cap: int | None = None
        self._msi_offset = 0
        # Declared MSI/MSI-X registers show the InterruptState ([_irq_start, _irq_end)).
        self._msi_regs: MsiRegisters | None = None
        self._msix_regs: MsixRegisters | None = None
        self._irq_start = self._irq_end = 0
        self._ctx: DeviceContext | None = None
        self._intx_level = False
        self._generation = 0

    # -- declaring the device ------------------------------------------------------------

    @property
    def header_type(self) -> int:
        return self._header_type

    def add_bar(
        self,
        index: int,
        size: int,
        kind: BarKind = BarKind.MEM32,
        prefetchable: bool = False,
        *,
        read: ReadHandler | None = None,
        write: WriteHandler | None = None,
        region: BarRegion | None = None,
    ) -> BarSpec:
        """Declare BAR ``index`` and what answers accesses to it.

        Give ``read``/``write`` handlers (``read(offset, size) -> int``,
        ``write(offset, size, value)``), or a :class:`BarRegion`, or neither for
        plain zero-filled memory. A 64-bit BAR also occupies ``index + 1``.
        """
        try:
            spec = BarSpec(index, size, kind, prefetchable)
        except ValueError as exc:
            raise DeviceSetupError(str(exc)) from exc
        limit = {0: 6, 1: 2, 2: 1}[self._header_type & 0x7F]
        used = {index, index + 1} if kind is BarKind.MEM64 else {index}
        if max(used) >= limit:
            raise DeviceSetupError(f"BAR{index} does not fit a header of type {self._header_type}")
        taken = {i for s, _ in self._bars.values() for i in self._slots(s)}
        if used & taken:
            raise DeviceSetupError(f"BAR{index} overlaps a BAR that is already declared")
        if region is not None and (read is not None or write is not None):
            raise DeviceSetupError(f"BAR{index}: give either handlers or a region, not both")
        if region is None:
            region = (
                HandlerRegion(read, write)
                if read is not None or write is not None
                else MemoryRegion(size)
            )
        for offset, flags, mask in bar_masks(spec):
            # Keep address bits already in the image (a snapshot's assigned base).
            current = self._regs.read(offset, 4) & mask
            self._regs.init_int(offset, 4, current | flags)
            self._regs.set_wmask_int(offset, 4, mask)
        self._bars[index] = (spec, region)
        return spec

    def set_bar_region(self, index: int, region: BarRegion) -> None:
        """Replace what answers BAR ``index`` (e.g. attach a model to a snapshot's BAR)."""
        self._bar(index)
        spec, _ = self._bars[index]
        self._bars[index] = (spec, region)

    def add_rom(self, size: int) -> None:
        """Declare an expansion ROM of ``size`` bytes (sizing and the enable bit work)."""
        if self._header_type & 0x7F == 2:
            raise DeviceSetupError("a CardBus bridge (header type 2) has no expansion ROM BAR")
        mask = rom_mask(size)
        offset = self._rom_offset()
        self._regs.init_int(offset, 4, self._regs.read(offset, 4) & mask)
        self._regs.set_wmask_int(offset, 4, mask)
        self._rom_size = size

    def add_capability(
        self,
        cap_id: int,
        body: bytes,
        *,
        writable_mask: bytes | None = None,
        w1c_mask: bytes | None = None,
    ) -> int:
        """Append a standard capability (from 0x40 up) and return its config offset.

        ``body`` is everything after the two header bytes (ID and next
        pointer), which stay read-only. ``writable_mask`` and ``w1c_mask``
        (same length as ``body``) say which body bits a write may change or
        clear; by default the body is read-only. Layout and linking are
        :class:`shared.pci.CapabilityBuilder`'s; it raises
        :class:`~shared.errors.CapabilityError` when the capability does not fit.
        """
        self._check_masks(body, writable_mask, w1c_mask)
        previous = self._last_cap
        offset = self._builder().add(cap_id, body)
        self._sync_from_builder(offset, 2 + len(body))
        link = Reg.CAPABILITY_LIST if previous is None else previous + 1
        self._sync_from_builder(link, 1)
        self._sync_from_builder(Reg.STATUS, 2)
        self._apply_body_masks(offset + 2, writable_mask, w1c_mask)
        self._last_cap = offset
        if cap_id == CapId.MSIX and len(body) >= 2:
            # Its enable and function-mask bits are the device's interrupt state.
            self._msix_regs = MsixRegisters(offset, int.from_bytes(body[:2], "little"))
            self._irq_span(self._msix_regs.start, self._msix_regs.end)
        return offset

    def add_extended_capability(
        self,
        cap_id: int,
        version: int,
        body: bytes,
        *,
        writable_mask: bytes | None = None,
        w1c_mask: bytes | None = None,
    ) -> int:
        """Append a PCIe extended capability (from 0x100 up) and return its offset.

        The 4-byte header is read-only; masks work as in :meth:`add_capability`.
        Needs ``config_size=4096``.
        """
        self._check_masks(body, writable_mask, w1c_mask)
        previous = self._last_ext_cap
        offset = self._builder().add_extended(cap_id, body, version=version)
        self._sync_from_builder(offset, 4 + len(body))
        if previous is not None:
            self._sync_from_builder(previous, 4)
        self._apply_body_masks(offset + 4, writable_mask, w1c_mask)
        self._last_ext_cap = offset
        return offset

    def add_msi_capability(
        self, vectors: int = 1, *, address_64: bool = True, per_vector_mask: bool = False
    ) -> int:
        """Add an MSI capability requesting ``vectors`` (1-32, a power of two)."""
        if self._msi_offset:
            raise DeviceSetupError("the device already has an MSI capability")
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise DeviceSetupError(f"MSI vectors {vectors} must be a power of two from 1 to 32")
        control = (vectors.bit_length() - 1) << 1
        control |= int(MsiControl.ADDR_64) if address_64 else 0
        control |= int(MsiControl.PER_VECTOR_MASK) if per_vector_mask else 0
        layout = msi_layout(control)
        body = bytearray(layout.size - 2)
        wmask = bytearray(layout.size - 2)

        def put(buf: bytearray, reg: int, size: int, value: int) -> None:
            buf[reg - 2 : reg - 2 + size] = value.to_bytes(size, "little")

        put(body, 2, 2, control)
        put(wmask, 2, 2, MsiControl.ENABLE | MsiControl.MULTIPLE_ENABLE_MASK)
        put(wmask, 4, 4, 0xFFFF_FFFC)  # message address is dword aligned
        if layout.address_hi is not None:
            put(wmask, layout.address_hi, 4, 0xFFFF_FFFF)
        put(wmask, layout.data, 2, 0xFFFF)
        if layout.mask is not None:
            put(wmask, layout.mask, 4, (1 << vectors) - 1)
        # The pending bits are the device's to set, so they stay read-only.
        self._msi_offset = self.add_capability(CapId.MSI, bytes(body), writable_mask=bytes(wmask))
        # Enable, vectors, message, masks and pending bits are the device's interrupt state.
        self._msi_regs = MsiRegisters(self._msi_offset, control)
        self._irq_span(self._msi_regs.start, self._msi_regs.end)
        return self._msi_offset

    def add_msix_capability(
        self, entries: int, *, bar: int, table_offset: int = 0, pba_offset: int | None = None
    ) -> int:
        """Add an MSI-X capability whose table and PBA sit in the declared BAR ``bar``.

        The table (``entries`` x 16 bytes at ``table_offset``) and the PBA
        (right after it, unless ``pba_offset`` says where) show the device's
        :attr:`interrupt_state`; the rest of the BAR stays the model's. Declare
        the BAR (and its region) first.
        """
        spec, region = self._bar(bar)
        body, wmask, pba = msix_capability_body(entries, bar, spec.size, table_offset, pba_offset)
        offset = self.add_capability(CapId.MSIX, body, writable_mask=wmask)
        self._bars[bar] = (spec, MsixTableRegion(
            region, entries=entries, table_offset=table_offset, pba_offset=pba,
            state=lambda: self.interrupt_state,
            unmasked=lambda ready: self.signal_unmasked(IRQ_MODE_MSIX, ready),
        ))  # fmt: skip
        return offset

    # -- running: the context, interrupts ------------------------------------------------

    def attach(self, ctx: DeviceContext) -> None:
        """Remember the backend's context (tasks, lock, interrupt sink, DMA)."""
        self._ctx = ctx

    @property
    def context(self) -> DeviceContext | None:
        """The attached context, or ``None`` when the device runs stand-alone (tests)."""
        return self._ctx

    @property
    def generation(self) -> int:
        """Bumped by every reset. A background task compares it to drop stale results."""
        return self._generation

    @property
    def interrupt_sink(self) -> InterruptSink:
        return self._ctx.interrupts if self._ctx is not None else _NULL_SINK

    @property
    def intx_asserted(self) -> bool:
        """The device's INTx level (the Status "interrupt" bit), whatever INTx disable says."""
        return self._intx_level

    def raise_intx(self) -> None:
        """Drive INTx active. Delivered unless Command.INTX_DISABLE is set."""
        if not self._regs.read(Reg.INTERRUPT_PIN, 1):
            raise DeviceSetupError("the device has no interrupt pin, so it cannot raise INTx")
        self._intx_level = True
        self._regs.set_bits(Reg.STATUS, 2, Status.INTERRUPT, True)
        self._update_intx_line()

    def lower_intx(self) -> None:
        """Release INTx."""
        self._intx_level = False
        self._regs.set_bits(Reg.STATUS, 2, Status.INTERRUPT, False)
        self._update_intx_line()

    @property
    def msi_enabled(self) -> bool:
        """Whether MSI is on (the device's :attr:`interrupt_state`)."""
        return bool(self._msi_offset) and self.interrupt_state.mode == IRQ_MODE_MSI

    def msi_message(self, vector: int) -> tuple[int, int]:
        """The ``(address, data)`` MSI message for ``vector``, as software programmed it."""
        self._msi_control()
        state = self.interrupt_state
        enabled = state.vectors if state.mode == IRQ_MODE_MSI else 1
        return state.msi_address, (state.msi_data & ~(enabled - 1)) | vector

    def signal_msi(self, vector: int = 0) -> None:
        """Send MSI ``vector``; a masked vector sets its pending bit instead."""
        self._msi_control()
        state = self.interrupt_state
        if state.mode != IRQ_MODE_MSI:
            raise PcisplitError(
                "the model signalled MSI while software has MSI disabled; check msi_enabled first",
                code=ErrorCode.INVALID_STATE,
            )
        if not 0 <= vector < state.vectors:
            raise PcisplitError(
                f"MSI vector {vector} is outside the {state.vectors} vector(s) software enabled",
                code=ErrorCode.INVALID_STATE,
            )
        # With an IRQ router the sink applies the state's masks (and counts what it
        # does); on its own the model applies them.
        if state.managed or state.signal(IRQ_MODE_MSI, vector) is Signal.DELIVER:
            self.interrupt_sink.signal_msi(vector)

    def signal_msix(self, vector: int) -> None:
        """Signal MSI-X table entry ``vector``; a masked entry sets its PBA bit instead.

        With an IRQ router (or no declared MSI-X capability) the sink applies the
        state; on its own the model does, and raises when MSI-X is off or the
        entry is outside the table.
        """
        state = self.interrupt_state
        if state.managed or self._msix_regs is None:
            self.interrupt_sink.signal_msix(vector)
            return
        result = state.signal(IRQ_MODE_MSIX, vector)
        if result is Signal.DELIVER:
            self.interrupt_sink.signal_msix(vector)
        elif result is not Signal.PENDING:
            raise PcisplitError(
                f"MSI-X entry {vector} cannot be signalled: MSI-X is off or the table has "
                f"{state.table_size} entries; check the MSI-X enable bit first",
                code=ErrorCode.INVALID_STATE,
            )

    def signal_unmasked(self, mode: int, vectors: int) -> None:
        """Send the vectors (bit per vector) that software unmasked while they were pending."""
        sink = self.interrupt_sink
        send = sink.signal_msix if mode == IRQ_MODE_MSIX else sink.signal_msi
        while vectors:
            low = vectors & -vectors
            send(low.bit_length() - 1)
            vectors ^= low

    # -- DeviceProvider ------------------------------------------------------------------

    @property
    def config_size(self) -> int:
        return self._regs.size

    def config_read(self, offset: int, size: int) -> int:
        if offset < self._irq_end and offset + size > self._irq_start:
            self._show_interrupt_state(offset, offset + size)
        return self._regs.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        irq = offset < self._irq_end and offset + size > self._irq_start
        if irq:
            self._show_interrupt_state(offset, offset + size)
        self._regs.write(offset, size, value)
        if offset <= Reg.COMMAND + 1 and offset + size > Reg.COMMAND + 1:
            self._update_intx_line()
        if irq:
            self._store_interrupt_state(offset, size)
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """Hook: called after every config write has been applied. Models may override."""

    def config_image(self) -> bytes:
        if self._irq_end:
            self._show_interrupt_state()
        return self._regs.image()

    def bars(self) -> list[BarSpec]:
        return [spec for _, (spec, _) in sorted(self._bars.items())]

    def rom_size(self) -> int:
        return self._rom_size

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        _spec, region = self._checked_bar_access(bar, offset, size)
        return region.read(offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        _spec, region = self._checked_bar_access(bar, offset, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ConfigAccessError(
                f"BAR{bar}: value {value:#x} does not fit in a {size}-byte write",
                code=ErrorCode.INVALID_SIZE,
            )
        region.write(offset, size, value)

    def reset(self) -> None:
        """Restore power-on config and model state; results of older tasks are dropped."""
        self._generation += 1
        self._regs.reset()
        self._intx_level = False
        self._update_intx_line()
        self.interrupt_state.reset()
        for _, region in self._bars.values():
            region.reset()
        self.reset_state()

    def reset_state(self) -> None:
        """Hook: restore the model's own power-on state. Models with state override it."""

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _slots(spec: BarSpec) -> tuple[int, ...]:
        return (spec.index, spec.index + 1) if spec.kind is BarKind.MEM64 else (spec.index,)

    def _rom_offset(self) -> int:
        return Reg.ROM_ADDRESS if self._header_type & 0x7F == 0 else 0x38

    def _bar(self, bar: int) -> tuple[BarSpec, BarRegion]:
        entry = self._bars.get(bar)
        if entry is None:
            have = ", ".join(f"BAR{i}" for i in sorted(self._bars)) or "none"
            raise ConfigAccessError(
                f"BAR{bar} is not implemented by this device (implemented: {have})",
                code=ErrorCode.NOT_FOUND,
            )
        return entry

    def _checked_bar_access(self, bar: int, offset: int, size: int) -> tuple[BarSpec, BarRegion]:
        spec, region = self._bar(bar)
        sizes = (1, 2, 4) if spec.kind is BarKind.IO else (1, 2, 4, 8)
        try:
            check_access(offset, size, spec.size, sizes=sizes)
        except ConfigAccessError as exc:
            raise ConfigAccessError(
                f"BAR{bar} ({spec.size:#x} bytes): {exc.message}", code=exc.code
            ) from exc
        return spec, region

    def _builder(self) -> CapabilityBuilder:
        if self._caps is None:
            raise DeviceSetupError(
                "this device's config space came from an image with its own capability "
                "list; capabilities cannot be added to it"
            )
        return self._caps

    def _sync_from_builder(self, offset: int, length: int) -> None:
        self._regs.init(offset, self._builder().space.read_bytes(offset, length))

    def _load_image(self, image: bytes) -> None:
        """Replace the power-on config with ``image`` (snapshot devices).

        The header gets its hardware masks; BARs, the ROM and any masks beyond
        the header are up to the caller. Call it before declaring BARs.
        """
        if self._bars or self._last_cap is not None or self._last_ext_cap is not None:
            raise DeviceSetupError("load a config image before declaring BARs or capabilities")
        header_type = image[Reg.HEADER_TYPE]
        if header_type & 0x7F not in (0, 1, 2):
            raise DeviceSetupError(
                f"header type {header_type:#x} is not supported; only 0 (endpoint), "
                "1 (PCI bridge) and 2 (CardBus bridge) are"
            )
        self._regs = RegisterFile(len(image))
        self._regs.init(0, image)
        self._header_type = header_type
        apply_header_masks(self._regs, header_type)
        self._caps = None
        msi = walk_capabilities(image).find(CapId.MSI) if len(image) > 0x40 else None
        self._msi_offset = msi.offset if msi is not None else 0

    def _set_masks(self, offset: int, wmask: bytes) -> None:
        """Set raw write masks (snapshot devices make their copy writable)."""
        self._regs.set_wmask(offset, wmask)

    def _apply_body_masks(self, offset: int, wmask: bytes | None, w1cmask: bytes | None) -> None:
        if wmask is not None:
            self._regs.set_wmask(offset, wmask)
        if w1cmask is not None:
            self._regs.set_w1cmask(offset, w1cmask)

    @staticmethod
    def _check_masks(body: bytes, *masks: bytes | None) -> None:
        for mask in masks:
            if mask is not None and len(mask) != len(body):
                raise DeviceSetupError(
                    f"a capability mask has {len(mask)} bytes but the body has {len(body)}"
                )

    def _msi_control(self) -> int:
        if not self._msi_offset:
            raise DeviceSetupError("the device has no MSI capability; call add_msi_capability")
        return self._regs.read(self._msi_offset + 2, 2)

    def _update_intx_line(self) -> None:
        # INTx reaches the sink only while Command.INTX_DISABLE is clear and MSI is off.
        # The line level is the interrupt state's: a router sink records it, else we do.
        disabled = bool(self._regs.read(Reg.COMMAND, 2) & Command.INTX_DISABLE)
        line = self._intx_level and not disabled and not self.msi_enabled
        state = self.interrupt_state
        if line == state.intx_level:
            return
        if not state.managed:
            state.set_intx_level(line)
        if line:
            self.interrupt_sink.assert_intx()
        else:
            self.interrupt_sink.deassert_intx()

    def _irq_span(self, start: int, end: int) -> None:
        if self._irq_end:
            start, end = min(start, self._irq_start), max(end, self._irq_end)
        self._irq_start, self._irq_end = start, end

    def _show_interrupt_state(self, lo: int = 0, hi: int = 0x1000) -> None:
        """Lay the interrupt state over the capability registers in ``[lo, hi)`` that show it."""
        state = self.interrupt_state
        overlays = []
        if self._msi_regs is not None:
            overlays += self._msi_regs.overlays(state, pending=True)
        if self._msix_regs is not None:
            overlays += self._msix_regs.overlays(state)
        regs = self._regs
        for offset, width, bits, value in overlays:
            if offset < hi and offset + width > lo:
                regs.set_bits(offset, width, bits, False)
                regs.set_bits(offset, width, value & bits, True)

    def _store_interrupt_state(self, offset: int, size: int) -> None:
        """A config write touched the interrupt registers: the state takes what changed."""
        state = self.interrupt_state
        read = self._regs.read
        if self._msi_regs is not None:
            ready = self._msi_regs.store(state, read, offset, size)
            self._update_intx_line()
            if ready:
                self.signal_unmasked(IRQ_MODE_MSI, ready)
        if self._msix_regs is not None:
            ready = self._msix_regs.store(state, read, offset, size)
            if ready:
                self.signal_unmasked(IRQ_MODE_MSIX, ready)
        self._show_interrupt_state()
