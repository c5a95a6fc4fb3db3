"""The shared-memory ring: layout declared once in C (``ring.h``), used through cffi.

Producer and consumer work on a buffer passed in (``bytearray`` or ``mmap``);
notification suppression uses Xen-style event indices. See ``docs/transports.md``.
"""

from shared.ring._region import (
    CLIENT_TO_SERVER,
    SERVER_TO_CLIENT,
    SHM_DATA_OFFSET,
    SHM_MAGIC,
    SHM_VERSION,
    ShmLayout,
    ring_size_for,
)
from shared.ring._ring import (
    RECORD_ALIGN,
    RECORD_HEADER,
    RING_CTRL_SIZE,
    RING_MAX_SIZE,
    RING_MIN_SIZE,
    RecordTooLargeError,
    RingConsumer,
    RingCorruptError,
    RingError,
    RingFullError,
    RingProducer,
    RingSpec,
    initialise_ring,
    need_notify,
    record_size,
)

__all__ = [
    "CLIENT_TO_SERVER",
    "SERVER_TO_CLIENT",
    "SHM_DATA_OFFSET",
    "SHM_MAGIC",
    "SHM_VERSION",
    "ShmLayout",
    "ring_size_for",
    "RECORD_ALIGN",
    "RECORD_HEADER",
    "RING_CTRL_SIZE",
    "RING_MAX_SIZE",
    "RING_MIN_SIZE",
    "RecordTooLargeError",
    "RingConsumer",
    "RingCorruptError",
    "RingError",
    "RingFullError",
    "RingProducer",
    "RingSpec",
    "initialise_ring",
    "need_notify",
    "record_size",
]
