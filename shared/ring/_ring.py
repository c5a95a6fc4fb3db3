"""Producer and consumer ends of one shared-memory ring.

The layout and every access to shared memory are in C (``ring.h``, compiled by
cffi); this module holds the private state, turns status codes into typed
errors, and keeps each hot-path operation to one C call.

Both ends work on any writable buffer passed in (a ``bytearray`` in unit tests,
an ``mmap`` of a memfd between processes), so the algorithm is testable with
no processes at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.errors import ErrorCode, PcisplitError
from shared.ring._cffi import ffi, lib

__all__ = [
    "RingError",
    "RingCorruptError",
    "RingFullError",
    "RecordTooLargeError",
    "RingSpec",
    "RingProducer",
    "RingConsumer",
    "initialise_ring",
    "record_size",
    "need_notify",
    "RING_CTRL_SIZE",
    "RING_MIN_SIZE",
    "RING_MAX_SIZE",
    "RECORD_HEADER",
    "RECORD_ALIGN",
]

RING_CTRL_SIZE: int = ffi.sizeof("struct pcisplit_ring_ctrl")
RING_MIN_SIZE: int = lib.PCISPLIT_RING_MIN_SIZE
RING_MAX_SIZE: int = lib.PCISPLIT_RING_MAX_SIZE
RECORD_HEADER: int = lib.PCISPLIT_RING_RECORD_HEADER
RECORD_ALIGN: int = lib.PCISPLIT_RING_ALIGN

_EMPTY: int = lib.PCISPLIT_RING_EMPTY
_FULL: int = lib.PCISPLIT_RING_FULL
_LOW32 = 0xFFFFFFFF


class RingError(PcisplitError):
    """A shared-ring operation failed."""


class RingCorruptError(RingError):
    """The peer wrote impossible indices or record lengths into the shared ring.

    The ring stays broken (every later operation raises this again): the only
    safe reaction is to disconnect that peer. ``status`` is the C status code,
    ``value`` the offending value and ``limit`` the bound it broke.
    """

    code = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, *, status: int, value: int, limit: int) -> None:
        super().__init__(message)
        self.status = status
        self.value = value
        self.limit = limit


class RingFullError(RingError):
    """``send_nowait``: the record does not fit until the consumer frees space."""


class RecordTooLargeError(RingError, ValueError):
    """A record is larger than the ring's negotiated ``max_record``."""


def record_size(length: int) -> int:
    """Bytes a record with a ``length``-byte payload occupies (header + padding)."""
    return (RECORD_HEADER + length + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)


def need_notify(event: int, new: int, old: int) -> bool:
    """Xen's event-index rule: notify iff ``event`` lies in ``(old, new]`` (mod 2**32)."""
    return bool(lib.pcisplit_need_notify(event & _LOW32, new & _LOW32, old & _LOW32))


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True, slots=True)
class RingSpec:
    """Where one ring lives inside a buffer, and its geometry.

    ``size`` is the data-area size (a power of two), ``max_record`` the largest
    payload either side accepts; one such record must fit in the ring.
    """

    size: int
    max_record: int
    ctrl_offset: int = 0
    data_offset: int = RING_CTRL_SIZE

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.size) or not RING_MIN_SIZE <= self.size <= RING_MAX_SIZE:
            raise RingError(
                f"ring size {self.size} must be a power of two between {RING_MIN_SIZE} "
                f"and {RING_MAX_SIZE} bytes"
            )
        if self.max_record < 0 or record_size(self.max_record) > self.size:
            raise RingError(
                f"max_record {self.max_record} does not fit a {self.size}-byte ring "
                f"(a record takes {RECORD_HEADER} header bytes and pads to {RECORD_ALIGN}); "
                "use a larger ring or a smaller frame limit"
            )
        for name, offset in (("ctrl_offset", self.ctrl_offset), ("data_offset", self.data_offset)):
            if offset < 0 or offset % RECORD_ALIGN:
                raise RingError(f"{name} {offset} must be a non-negative multiple of 8")
        ctrl = range(self.ctrl_offset, self.ctrl_offset + RING_CTRL_SIZE)
        data = range(self.data_offset, self.data_offset + self.size)
        if ctrl.start < data.stop and data.start < ctrl.stop:
            raise RingError("the ring's control block overlaps its data area")

    @classmethod
    def standalone(cls, size: int, max_record: int | None = None) -> RingSpec:
        """A ring alone in a buffer: control block at 0, data right after it."""
        if max_record is None:
            max_record = size - RECORD_ALIGN
        return cls(size=size, max_record=max_record)

    @property
    def end(self) -> int:
        """The smallest buffer length that holds this ring."""
        return max(self.ctrl_offset + RING_CTRL_SIZE, self.data_offset + self.size)


def _pointer(cbuf: Any, offset: int, ctype: str) -> Any:
    ptr = ffi.cast("uint8_t *", cbuf) + offset
    # Atomic u32 accesses need natural alignment; a misaligned buffer is a caller bug.
    if int(ffi.cast("uintptr_t", ptr)) % RECORD_ALIGN:
        raise RingError("ring memory must be 8-byte aligned; use an mmap or a fresh bytearray")
    return ffi.cast(ctype, ptr)


def initialise_ring(buffer: Any, spec: RingSpec, *, initial_index: int = 0) -> None:
    """Reset the shared indices of a ring to an empty state at ``initial_index``.

    Only the side that creates the memory does this, before the peer attaches.
    Tests start near ``2**32`` to exercise index wrap-around.
    """
    if not 0 <= initial_index <= _LOW32 or initial_index % RECORD_ALIGN:
        raise RingError(f"initial index {initial_index} must be a multiple of 8 below 2**32")
    cbuf = ffi.from_buffer(buffer, require_writable=True)
    try:
        if len(cbuf) < spec.end:
            raise RingError(f"buffer of {len(cbuf)} bytes is too small for the ring ({spec.end})")
        lib.pcisplit_ring_reset(
            _pointer(cbuf, spec.ctrl_offset, "struct pcisplit_ring_ctrl *"), initial_index
        )
    finally:
        ffi.release(cbuf)


_MESSAGES = {
    lib.PCISPLIT_RING_E_PROD_AHEAD: (
        "peer's producer index {value:#x} is more than the ring size ahead of our consumer "
        "index {limit:#x}"
    ),
    lib.PCISPLIT_RING_E_PROD_BACKWARDS: (
        "peer's producer index moved backwards to {value:#x} (we had already seen {limit:#x})"
    ),
    lib.PCISPLIT_RING_E_MISALIGNED: "peer's index {value:#x} is not a multiple of {limit}",
    lib.PCISPLIT_RING_E_RECORD_TOO_LARGE: (
        "peer announced a {value}-byte record; the negotiated limit is {limit} bytes"
    ),
    lib.PCISPLIT_RING_E_RECORD_PAST_END: (
        "peer's {value}-byte record runs past the published data ({limit} bytes available)"
    ),
    lib.PCISPLIT_RING_E_CONS_INVALID: (
        "peer's consumer index {value:#x} moved backwards or past our published producer "
        "index {limit:#x}"
    ),
    lib.PCISPLIT_RING_E_NOT_EMPTY: (
        "ring was not empty at attach (prod {value:#x}, cons {limit:#x}); the peer wrote early"
    ),
}


class _RingEnd:
    """State shared by both ends: the mapped buffer and the private C struct."""

    __slots__ = ("_cbuf", "_r", "spec")

    def __init__(self, buffer: Any, spec: RingSpec, *, consumer: bool) -> None:
        self.spec = spec
        self._cbuf = ffi.from_buffer(buffer, require_writable=True)
        try:
            if len(self._cbuf) < spec.end:
                raise RingError(
                    f"buffer of {len(self._cbuf)} bytes is too small for the ring ({spec.end})"
                )
            self._r = ffi.new("struct pcisplit_ring *")
            rc: int = lib.pcisplit_ring_attach(
                self._r,
                _pointer(self._cbuf, spec.ctrl_offset, "struct pcisplit_ring_ctrl *"),
                _pointer(self._cbuf, spec.data_offset, "uint8_t *"),
                spec.size,
                spec.max_record,
                int(consumer),
            )
            if rc:
                self._raise(rc)
        except BaseException:
            ffi.release(self._cbuf)
            raise

    def release(self) -> None:
        """Let go of the buffer (needed before ``mmap.close()``). Idempotent.

        Later operations raise :class:`RingError` instead of touching memory.
        """
        lib.pcisplit_ring_release(self._r)
        ffi.release(self._cbuf)

    @property
    def broken(self) -> bool:
        """True once the peer corrupted the ring (or after :meth:`release`)."""
        return bool(self._r.broken)

    @property
    def private_prod(self) -> int:
        """Producer: next write index. Consumer: last validated peer producer index."""
        return int(self._r.prod_pvt)

    @property
    def private_cons(self) -> int:
        """Consumer: next read index. Producer: last validated peer consumer index."""
        return int(self._r.cons_pvt)

    def _raise(self, rc: int, length: int = 0) -> None:
        if rc == lib.PCISPLIT_RING_E_LOCAL_TOO_LARGE:
            raise RecordTooLargeError(
                f"a {length}-byte record exceeds the ring's {self.spec.max_record}-byte limit"
            )
        if rc == lib.PCISPLIT_RING_E_RELEASED:
            raise RingError("this ring end was released; it can no longer be used")
        value, limit = int(self._r.bad_value), int(self._r.bad_limit)
        template = _MESSAGES.get(rc, "ring failed with unknown status {status}")
        message = template.format(value=value, limit=limit, status=rc)
        raise RingCorruptError(
            f"shared ring corrupt: {message}; disconnect this peer", status=rc, value=value,
            limit=limit,
        )


def _as_cbuffer(frame: bytes | bytearray | memoryview) -> Any:
    # bytes passes to ``const char *`` without a copy; other buffers need from_buffer.
    return frame if type(frame) is bytes else ffi.from_buffer(frame)


class RingProducer(_RingEnd):
    """The writing end of one ring."""

    __slots__ = ()

    def __init__(self, buffer: Any, spec: RingSpec) -> None:
        super().__init__(buffer, spec, consumer=False)

    def send_nowait(self, frame: bytes | bytearray | memoryview) -> bool:
        """Write and publish one record. Returns True when the peer must be notified.

        Raises :class:`RingFullError` (nothing written) when it does not fit yet,
        :class:`RecordTooLargeError`, or :class:`RingCorruptError`.
        """
        rc: int = lib.pcisplit_ring_send(self._r, _as_cbuffer(frame), len(frame))
        if rc >= 0:
            return rc == 1
        if rc == _FULL:
            raise RingFullError("the ring is full; wait for the consumer")
        self._raise(rc, len(frame))
        raise AssertionError("unreachable")  # pragma: no cover

    def write_nowait(self, frame: bytes | bytearray | memoryview) -> None:
        """Write one record without publishing it (batching: call :meth:`publish` once)."""
        rc: int = lib.pcisplit_ring_write(self._r, _as_cbuffer(frame), len(frame))
        if rc == 0:
            return
        if rc == _FULL:
            raise RingFullError("the ring is full; publish and wait for the consumer")
        self._raise(rc, len(frame))

    def publish(self) -> bool:
        """Make written records visible. True when the peer must be notified (once per batch)."""
        rc: int = lib.pcisplit_ring_publish(self._r)
        if rc < 0:
            self._raise(rc)
        return rc == 1

    def free_space(self) -> int:
        """Bytes free for records right now (re-reads the consumer's index)."""
        rc: int = lib.pcisplit_ring_free_space(self._r)
        if rc < 0:
            self._raise(rc)
        return int(rc)

    def prepare_wait_space(self, length: int) -> bool:
        """Final check before sleeping for space for a ``length``-byte record.

        Asks the consumer to notify once that much space is free, then checks
        again. True: the space is there now (do not sleep).
        """
        rc: int = lib.pcisplit_ring_prepare_wait_space(self._r, length)
        if rc < 0:
            self._raise(rc, length)
        return rc == 1

    @property
    def unpublished(self) -> int:
        """Bytes written but not yet published."""
        return (int(self._r.prod_pvt) - int(self._r.published)) & _LOW32


class RingConsumer(_RingEnd):
    """The reading end of one ring. Frames are copied once into private memory."""

    __slots__ = ("_cap", "_out", "_view")

    def __init__(self, buffer: Any, spec: RingSpec) -> None:
        super().__init__(buffer, spec, consumer=True)
        # Private landing area: the C side copies each record here exactly once,
        # and only this copy is ever looked at (XSA-155).
        scratch = bytearray(max(spec.max_record, 1))
        self._out = ffi.from_buffer("char[]", scratch)
        self._view = memoryview(scratch)
        self._cap = spec.max_record

    def receive_nowait(self) -> tuple[bytes, bool] | None:
        """Take the next record: ``(payload, notify_peer)``, or None when empty.

        ``notify_peer`` is True when the producer waits for the space just freed.
        """
        rc: int = lib.pcisplit_ring_read(self._r, self._out, self._cap)
        if rc >= 0:
            return bytes(self._view[: rc & _LOW32]), rc > _LOW32
        if rc == _EMPTY:
            return None
        self._raise(rc)
        raise AssertionError("unreachable")  # pragma: no cover

    def prepare_wait(self) -> bool:
        """Final check before sleeping: set the event index, fence, look again.

        True: data arrived meanwhile (do not sleep). False: the producer will
        notify for the next record.
        """
        rc: int = lib.pcisplit_ring_prepare_wait(self._r)
        if rc < 0:
            self._raise(rc)
        return rc == 1

    def spin(self, budget_ns: int) -> bool:
        """Busy-poll the producer index for up to ``budget_ns``. True: data arrived."""
        rc: int = lib.pcisplit_ring_spin(self._r, budget_ns)
        if rc < 0:
            self._raise(rc)
        return rc == 1

    def release(self) -> None:
        super().release()
        ffi.release(self._out)
