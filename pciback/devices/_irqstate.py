"""One device's interrupt state: the one place INTx, MSI and MSI-X state lives.

:class:`InterruptState` holds which mode is on (INTx, MSI or MSI-X; the three
exclude each other), how many vectors it has, the MSI-X table size, the
per-vector masks, the MSI-X function mask, the pending bits (MSI's pending
register, MSI-X's PBA), the MSI message address and data, the MSI-X
table's messages, the INTx line level and the INTx in-service latch. Every
device provider has exactly one
(:attr:`pciback.devices.DeviceProvider.interrupt_state`):

- a model's MSI and MSI-X capability registers, and the MSI-X table and PBA
  it lays into a BAR, read and change it (:class:`pciback.devices.EmulatedDevice`);
- a guest's policy shows it in the capability's control, address, data and
  mask registers (``pciback.policy``);
- the IRQ router (``pciback.plane.irq``) carries out the guest's interrupt
  operations on it and delivers what it says to deliver.

The operations apply the PCI rules and return what the caller must deliver;
nothing here does I/O or calls anybody back, so the rules are tested on their
own (``tests/pciback/devices/test_irqstate.py``). :meth:`InterruptState.save`
gives the state as a plain dictionary, and :meth:`InterruptState.restore`
takes one back (checked, since a saved state may come from elsewhere).

Rules, as the operations apply them:

- :meth:`~InterruptState.enable` turns one mode on with a number of vectors
  (refused while another mode is on); :meth:`~InterruptState.disable` turns it
  off and clears the vectors, masks, the function mask, the pending bits and the
  in-service latch.
- :meth:`~InterruptState.signal` is one edge of an MSI or MSI-X vector: a vector
  that is masked (per vector, or by the function mask) sets its pending bit
  instead of being delivered, once however often it fires.
- Unmasking (:meth:`~InterruptState.set_mask`,
  :meth:`~InterruptState.set_function_mask`, :meth:`~InterruptState.set_masks`)
  returns the pending vectors that are now unmasked and clears their bits:
  the caller delivers them.
- INTx is level-triggered with late EOI: a rising line (or enabling INTx while
  the line is up) is delivered once and puts the line in service; nothing more
  is delivered until :meth:`~InterruptState.eoi_intx`, after which a line that is
  still up is delivered again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping

from shared.errors import ErrorCode, PcisplitError
from shared.pci import MsiControl, MsixControl, msi_layout
from shared.protocol import IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX, IRQ_MODES, MAX_MSIX_VECTORS

__all__ = [
    "InterruptState",
    "InterruptStateError",
    "Signal",
    "MsiRegisters",
    "MsixRegisters",
    "STATE_FIELDS",
]

_MODE_NAMES = {IRQ_MODE_INTX: "INTx", IRQ_MODE_MSI: "MSI", IRQ_MODE_MSIX: "MSI-X"}
#: The largest vector count any mode has (the MSI-X table maximum).
_MAX_VECTORS = MAX_MSIX_VECTORS
_MSI_MAX_VECTORS = 32
#: ``read(offset, size)``: a config read of the register file a view is laid over.
_Read = Callable[[int, int], int]


class InterruptStateError(PcisplitError):
    """An interrupt-state operation that the device's current state does not allow."""

    code = ErrorCode.INVALID_STATE


class Signal(enum.Enum):
    """What became of one MSI or MSI-X edge (:meth:`InterruptState.signal`)."""

    #: Deliver it now.
    DELIVER = "deliver"
    #: The vector (or the function) is masked: its pending bit is set instead.
    PENDING = "pending"
    #: The mode is off, or the vector is not one of the enabled vectors: dropped.
    OFF = "off"
    #: MSI-X: the entry lies outside the device's table (XSA-164): the model is wrong.
    OUTSIDE_TABLE = "outside-table"


#: The keys of :meth:`InterruptState.save`, in order.
STATE_FIELDS = (
    "mode",
    "vectors",
    "table_size",
    "masked",
    "pending",
    "function_masked",
    "msi_mme",
    "msi_address",
    "msi_data",
    "msix_messages",
    "intx_level",
    "intx_in_service",
)


class InterruptState:
    """One device's INTx, MSI and MSI-X state, and the operations on it.

    The attributes are public to read; change them through the operations.
    ``managed`` is not device state but who changes it: ``False`` (the default)
    means config-space writes to the enable and mask bits take effect, as on
    hardware (a model or a policy on its own); the IRQ router sets it to
    ``True`` for the devices it serves, and then only its operations turn modes
    on and off and change masks, and such config writes are ignored (a guest
    cannot program delivery behind the router's back, XSA-120/128/129).
    """

    __slots__ = (*STATE_FIELDS, "managed")

    def __init__(self) -> None:
        self.managed = False
        self.reset()

    def reset(self) -> None:
        """Power-on state: no mode, nothing masked or pending, line low, no message."""
        #: IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX, or None.
        self.mode: int | None = None
        #: Vectors of the enabled mode (INTx: 1; MSI: the enabled count; MSI-X: the granted).
        self.vectors = 0
        #: MSI-X: entries in the device's table (0 unless MSI-X is on).
        self.table_size = 0
        #: Bit per masked vector (MSI-X vector control, or MSI's mask register).
        self.masked = 0
        #: Bit per vector that fired while masked (MSI's pending register, MSI-X's PBA).
        self.pending = 0
        #: MSI-X: the function mask (masks every vector; software may set it while MSI-X is off).
        self.function_masked = False
        #: MSI: the Multiple Message Enable field (0-7; 6 and 7 are reserved and mean 32).
        #: Software may write it while MSI is off; while MSI is on it encodes ``vectors``.
        self.msi_mme = 0
        #: MSI: the message address (64 bits) and data software programmed.
        self.msi_address = 0
        self.msi_data = 0
        #: MSI-X: table entry -> (message address, message data) software programmed.
        self.msix_messages: dict[int, tuple[int, int]] = {}
        #: INTx: the line level the device drives (after INTx disable and MSI gating).
        self.intx_level = False
        #: INTx: delivered and not yet EOI'd.
        self.intx_in_service = False

    # -- modes -------------------------------------------------------------------------

    def enable(
        self, mode: int, vectors: int, *, table_size: int = 0, mme: int | None = None
    ) -> bool:
        """Turn ``mode`` on with ``vectors`` vectors (MSI-X: of a ``table_size`` table).

        ``mme``: MSI's Multiple Message Enable field as software wrote it
        (default: the one ``vectors`` encodes). Masks set while the mode was
        off stay (software may mask before it enables, as on hardware);
        pending bits and the latch start clear.
        Returns True when the caller must deliver INTx vector 0 now: INTx was
        enabled while the line is up (it is now in service).
        Raises :class:`InterruptStateError` when a mode is already on or the
        counts are impossible; nothing changes then.
        """
        if self.mode is not None:
            raise InterruptStateError(
                f"cannot enable {_name(mode)}: {_name(self.mode)} is on; disable it first"
            )
        _check_counts(mode, vectors, table_size)
        self.mode = mode
        self.vectors = vectors
        self.table_size = table_size if mode == IRQ_MODE_MSIX else 0
        if mode == IRQ_MODE_MSI:
            self.msi_mme = _mme(vectors, mme)
        self.pending = 0
        self.intx_in_service = False
        if mode == IRQ_MODE_INTX and self.intx_level:
            self.intx_in_service = True
            return True
        return False

    def disable(self) -> None:
        """Turn the mode off; vectors, masks, the function mask, pending bits and latch clear."""
        self.mode = None
        self.vectors = 0
        self.table_size = 0
        self.masked = 0
        self.pending = 0
        self.function_masked = False
        self.msi_mme = 0
        self.intx_in_service = False

    def set_msi_mme(self, mme: int) -> None:
        """MSI: software wrote Multiple Message Enable (0-7); while MSI is on, the vector count."""
        if not 0 <= mme <= 7:
            raise InterruptStateError(f"Multiple Message Enable {mme!r} is not a 3-bit field")
        self.msi_mme = mme
        if self.mode == IRQ_MODE_MSI:
            self.vectors = 1 << min(mme, 5)
            self.pending &= (1 << self.vectors) - 1

    # -- MSI and MSI-X -----------------------------------------------------------------

    def signal(self, mode: int, vector: int) -> Signal:
        """One edge of ``mode``'s ``vector``: deliver it, hold it pending, or drop it."""
        if mode != self.mode or mode == IRQ_MODE_INTX:
            return Signal.OFF
        if mode == IRQ_MODE_MSIX and not 0 <= vector < self.table_size:
            return Signal.OUTSIDE_TABLE
        if not 0 <= vector < self.vectors:
            return Signal.OFF
        bit = 1 << vector
        if self.function_masked or self.masked & bit:
            self.pending |= bit
            return Signal.PENDING
        return Signal.DELIVER

    def set_mask(self, vector: int, masked: bool) -> int:
        """Mask or unmask one vector; returns the vectors to deliver now (bit per vector)."""
        if not 0 <= vector < _MAX_VECTORS:
            raise InterruptStateError(
                f"vector {vector} is outside 0..{_MAX_VECTORS - 1}", code=ErrorCode.INVALID_OFFSET
            )
        bit = 1 << vector
        return self.set_masks(self.masked | bit if masked else self.masked & ~bit)

    def set_masks(self, masked: int) -> int:
        """Set every per-vector mask at once (MSI's mask register); returns what to deliver."""
        if not 0 <= masked < 1 << _MAX_VECTORS:
            raise InterruptStateError(f"mask bits {masked:#x} do not fit {_MAX_VECTORS} vectors")
        self.masked = masked
        return self._take_ready()

    def set_function_mask(self, masked: bool) -> int:
        """MSI-X: set or clear the function mask; returns the vectors to deliver now."""
        self.function_masked = masked
        return self._take_ready()

    def _take_ready(self) -> int:
        if self.function_masked:
            return 0
        ready = self.pending & ~self.masked
        self.pending &= ~ready
        return ready

    def set_message(self, address: int, data: int) -> None:
        """MSI: the message address (up to 64 bits) and data (16 bits) software programmed."""
        if not 0 <= address < 1 << 64 or not 0 <= data <= 0xFFFF:
            raise InterruptStateError(
                f"MSI message {address:#x}/{data:#x} does not fit 64 address and 16 data bits"
            )
        self.msi_address = address
        self.msi_data = data

    def set_msix_message(self, entry: int, address: int, data: int) -> None:
        """MSI-X: table ``entry``'s message address (64 bits) and data (32 bits)."""
        if not 0 <= entry < _MAX_VECTORS:
            raise InterruptStateError(
                f"MSI-X entry {entry} is outside 0..{_MAX_VECTORS - 1}",
                code=ErrorCode.INVALID_OFFSET,
            )
        if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
            raise InterruptStateError(
                f"MSI-X message {address:#x}/{data:#x} does not fit 64 address and 32 data bits"
            )
        if address or data:
            self.msix_messages[entry] = (address, data)
        else:
            self.msix_messages.pop(entry, None)

    # -- INTx --------------------------------------------------------------------------

    def set_intx_level(self, level: bool) -> bool:
        """The device drives its line; True when the caller must deliver INTx vector 0 now."""
        self.intx_level = level
        if level and self.mode == IRQ_MODE_INTX and not self.intx_in_service:
            self.intx_in_service = True
            return True
        return False

    def eoi_intx(self) -> bool:
        """End of interrupt: the latch clears; True when the line is still up (deliver again).

        Raises :class:`InterruptStateError` when nothing is in service (a spurious EOI).
        """
        if not self.intx_in_service:
            raise InterruptStateError("INTx EOI with nothing in service")
        self.intx_in_service = self.intx_level
        return self.intx_level

    # -- the plain form ----------------------------------------------------------------

    def save(self) -> dict[str, int | bool | list[list[int]] | None]:
        """The state as a plain dictionary (keys :data:`STATE_FIELDS`); ``managed`` is not in it.

        ``msix_messages`` becomes a list of ``[entry, address, data]``, by entry.
        """
        saved: dict[str, int | bool | list[list[int]] | None] = {
            name: getattr(self, name) for name in STATE_FIELDS
        }
        saved["msix_messages"] = [[e, a, d] for e, (a, d) in sorted(self.msix_messages.items())]
        return saved

    def restore(self, saved: Mapping[str, object]) -> None:
        """Take back a :meth:`save` dictionary, after checking every field.

        Raises :class:`InterruptStateError` naming the first bad field; nothing
        changes then.
        """
        missing = [name for name in STATE_FIELDS if name not in saved]
        extra = sorted(set(saved) - set(STATE_FIELDS))
        if missing or extra:
            raise InterruptStateError(
                f"a saved interrupt state has the keys {', '.join(STATE_FIELDS)}; "
                f"missing {missing or 'none'}, unknown {extra or 'none'}"
            )
        mode = saved["mode"]
        if mode is not None and (type(mode) is not int or mode not in IRQ_MODES):
            raise InterruptStateError(f"saved mode {mode!r} is not None or one of {IRQ_MODES}")
        ints = {}
        for name, top in (
            ("vectors", _MAX_VECTORS),
            ("table_size", _MAX_VECTORS),
            ("msi_mme", 7),
            ("masked", (1 << _MAX_VECTORS) - 1),
            ("pending", (1 << _MAX_VECTORS) - 1),
            ("msi_address", (1 << 64) - 1),
            ("msi_data", 0xFFFF),
        ):
            value = saved[name]
            if type(value) is not int or not 0 <= value <= top:
                raise InterruptStateError(f"saved {name} {value!r} is not an integer 0..{top:#x}")
            ints[name] = value
        flags = {}
        for name in ("function_masked", "intx_level", "intx_in_service"):
            value = saved[name]
            if type(value) is not bool:
                raise InterruptStateError(f"saved {name} {value!r} is not true or false")
            flags[name] = value
        if mode is None:
            if ints["vectors"] or ints["table_size"] or ints["pending"]:
                raise InterruptStateError(
                    "a saved state with no mode on has no vectors, table or pending bits"
                )
        else:
            _check_counts(mode, ints["vectors"], ints["table_size"])
            if ints["pending"] >> ints["vectors"]:
                raise InterruptStateError("saved pending bits lie beyond the enabled vectors")
            if mode == IRQ_MODE_MSI:
                _mme(ints["vectors"], ints["msi_mme"])
        if flags["intx_in_service"] and mode != IRQ_MODE_INTX:
            raise InterruptStateError("an INTx line is in service only while INTx is on")
        messages = _messages(saved["msix_messages"])
        self.mode = mode
        self.msix_messages = messages
        for name, value in ints.items():
            setattr(self, name, value)
        for name, flag in flags.items():
            setattr(self, name, flag)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.save().items())
        return f"InterruptState({fields}, managed={self.managed})"


def _name(mode: int) -> str:
    return _MODE_NAMES.get(mode, f"mode {mode}")


def _messages(saved: object) -> dict[int, tuple[int, int]]:
    """Check a saved ``msix_messages`` list of ``[entry, address, data]``."""
    if not isinstance(saved, list):
        raise InterruptStateError(f"saved msix_messages {saved!r} is not a list")
    out: dict[int, tuple[int, int]] = {}
    for item in saved:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 3
            or any(type(v) is not int for v in item)
        ):
            raise InterruptStateError(
                f"saved msix_messages entry {item!r} is not [entry, address, data]"
            )
        entry, address, data = item
        if not 0 <= entry < _MAX_VECTORS or entry in out:
            raise InterruptStateError(f"saved msix_messages entry {entry} is out of range or twice")
        if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
            raise InterruptStateError(
                f"saved msix_messages entry {entry}: {address:#x}/{data:#x} does not fit "
                "64 address and 32 data bits"
            )
        if address or data:
            out[entry] = (address, data)
    return out


def _mme(vectors: int, mme: int | None) -> int:
    """MSI's Multiple Message Enable field for ``vectors`` (``mme``, checked, when given)."""
    encoded = vectors.bit_length() - 1
    if mme is None:
        return encoded
    if not 0 <= mme <= 7 or min(mme, 5) != encoded:
        raise InterruptStateError(
            f"Multiple Message Enable {mme!r} does not encode {vectors} MSI vector(s)"
        )
    return mme


def _check_counts(mode: int, vectors: int, table_size: int) -> None:
    if mode == IRQ_MODE_INTX:
        ok = vectors == 1
    elif mode == IRQ_MODE_MSI:
        ok = 0 < vectors <= _MSI_MAX_VECTORS and not vectors & (vectors - 1)
    elif mode == IRQ_MODE_MSIX:
        ok = 0 < vectors <= table_size <= _MAX_VECTORS
    else:
        raise InterruptStateError(f"unknown interrupt mode {mode!r}; use one of {IRQ_MODES}")
    if not ok:
        raise InterruptStateError(
            f"{_name(mode)} cannot have {vectors} vector(s)"
            + (f" of a {table_size}-entry table" if mode == IRQ_MODE_MSIX else "")
        )


# --------------------------------------------------------------------------- registers


class MsiRegisters:
    """Where an MSI capability's state-backed registers sit, and how they map to the state.

    ``offset`` is the capability's config offset, ``control`` its message
    control value (only the read-only layout bits are used). The enable and
    Multiple Message Enable bits, the message address and data and the mask
    register show the :class:`InterruptState`; the rest of the capability is
    the device's. Used by the emulated-device framework and by the policy, so
    both show one state.
    """

    __slots__ = ("_address_hi", "_data", "_mask", "_pending", "end", "offset", "start")

    def __init__(self, offset: int, control: int) -> None:
        layout = msi_layout(control)
        self.offset = offset
        self._address_hi = None if layout.address_hi is None else offset + layout.address_hi
        self._data = offset + layout.data
        self._mask = None if layout.mask is None else offset + layout.mask
        self._pending = None if layout.pending is None else offset + layout.pending
        #: The bytes ``[start, end)`` whose reads and writes involve the state.
        self.start = offset + 2
        self.end = offset + layout.size

    def overlays(self, state: InterruptState, *, pending: bool) -> list[tuple[int, int, int, int]]:
        """``(offset, width, bits, value)``: register bits the state decides, and their value.

        ``pending``: also the pending register (a model's; a policy reads the device's).
        """
        on = state.mode == IRQ_MODE_MSI
        control = (int(MsiControl.ENABLE) if on else 0) | (state.msi_mme << 4)
        out = [
            (self.offset + 2, 2, int(MsiControl.ENABLE | MsiControl.MULTIPLE_ENABLE_MASK), control),
            (self.offset + 4, 4, 0xFFFF_FFFF, state.msi_address & 0xFFFF_FFFF),
            (self._data, 2, 0xFFFF, state.msi_data),
        ]
        if self._address_hi is not None:
            out.append((self._address_hi, 4, 0xFFFF_FFFF, state.msi_address >> 32))
        if self._mask is not None:
            out.append((self._mask, 4, 0xFFFF_FFFF, state.masked & 0xFFFF_FFFF))
            if pending and self._pending is not None:
                out.append((self._pending, 4, 0xFFFF_FFFF, state.pending & 0xFFFF_FFFF))
        return out

    def store(self, state: InterruptState, read: _Read, offset: int, size: int) -> int:
        """Apply a config write of ``[offset, offset+size)``, read back through ``read``.

        Returns the MSI vectors to deliver now (an unmask of pending vectors).
        Enable, Multiple Message Enable and masks change only while the state
        is not ``managed``; the message always does.
        """
        end = offset + size
        ready = 0
        address = state.msi_address
        if offset < self.offset + 8 and end > self.offset + 4:
            address = (address & ~0xFFFF_FFFF) | read(self.offset + 4, 4)
        hi = self._address_hi
        if hi is not None and offset < hi + 4 and end > hi:
            address = (address & 0xFFFF_FFFF) | (read(hi, 4) << 32)
        data = read(self._data, 2) if offset < self._data + 2 and end > self._data else None
        state.set_message(address, state.msi_data if data is None else data)
        if state.managed:
            return 0
        mask = self._mask
        if mask is not None and offset < mask + 4 and end > mask:
            ready |= state.set_masks((state.masked & ~0xFFFF_FFFF) | read(mask, 4))
        if offset < self.offset + 4 and end > self.offset + 2:
            control = read(self.offset + 2, 2)
            mme = (control & MsiControl.MULTIPLE_ENABLE_MASK) >> 4
            vectors = 1 << min(mme, 5)
            if not control & MsiControl.ENABLE:
                if state.mode == IRQ_MODE_MSI:
                    state.disable()
                state.set_msi_mme(mme)
            elif state.mode == IRQ_MODE_MSI:
                state.set_msi_mme(mme)
            else:
                if state.mode is not None:
                    state.disable()
                state.enable(IRQ_MODE_MSI, vectors, mme=mme)
        return ready


class MsixRegisters:
    """An MSI-X capability's state-backed bits: enable and function mask in message control."""

    __slots__ = ("end", "offset", "start", "table_size")

    def __init__(self, offset: int, control: int) -> None:
        self.offset = offset
        self.start = offset + 2
        self.end = offset + 4
        self.table_size = (control & MsixControl.TABLE_SIZE_MASK) + 1

    def overlays(self, state: InterruptState) -> list[tuple[int, int, int, int]]:
        """``(offset, width, bits, value)`` of the control bits the state decides."""
        value = int(MsixControl.ENABLE) if state.mode == IRQ_MODE_MSIX else 0
        if state.function_masked:
            value |= MsixControl.FUNCTION_MASK
        bits = int(MsixControl.ENABLE | MsixControl.FUNCTION_MASK)
        return [(self.offset + 2, 2, bits, value)]

    def store(self, state: InterruptState, read: _Read, offset: int, size: int) -> int:
        """Apply a config write over message control (unless ``managed``).

        Returns the MSI-X vectors to deliver now (a function unmask of pending vectors).
        """
        if state.managed or not (offset < self.end and offset + size > self.start):
            return 0
        control = read(self.offset + 2, 2)
        if not control & MsixControl.ENABLE:
            if state.mode == IRQ_MODE_MSIX:
                state.disable()
        elif state.mode != IRQ_MODE_MSIX:
            if state.mode is not None:
                state.disable()
            state.enable(IRQ_MODE_MSIX, self.table_size, table_size=self.table_size)
        return state.set_function_mask(bool(control & MsixControl.FUNCTION_MASK))
