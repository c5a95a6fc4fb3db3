"""The shared region of a ``shm:`` session: a header and one ring per direction.

Offsets come from the C declaration (``struct pcisplit_shm_header`` in
``ring.h``), so Python, C peers and the docs agree on one layout::

    0                  struct pcisplit_shm_header (magic, version, sizes,
                       ring[0] ctrl: client->server, ring[1] ctrl: server->client)
    4096               ring 0 data (size_c2s bytes)
    4096 + size_c2s    ring 1 data (size_s2c bytes)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.ring._cffi import ffi, lib
from shared.ring._ring import (
    RING_CTRL_SIZE,
    RingError,
    RingSpec,
    initialise_ring,
    record_size,
)

__all__ = [
    "ShmLayout",
    "CLIENT_TO_SERVER",
    "SERVER_TO_CLIENT",
    "SHM_MAGIC",
    "SHM_VERSION",
    "SHM_DATA_OFFSET",
    "ring_size_for",
]

CLIENT_TO_SERVER = 0
SERVER_TO_CLIENT = 1
SHM_MAGIC: int = lib.PCISPLIT_SHM_MAGIC
SHM_VERSION: int = lib.PCISPLIT_SHM_VERSION
SHM_DATA_OFFSET: int = lib.PCISPLIT_SHM_DATA_OFFSET
_CTRL_BASE: int = ffi.offsetof("struct pcisplit_shm_header", "ring")


def ring_size_for(requested: int, max_record: int) -> int:
    """The ring size to use: ``requested`` rounded up to a power of two, and at
    least large enough for one record of ``max_record`` bytes."""
    need: int = max(requested, record_size(max_record), lib.PCISPLIT_RING_MIN_SIZE)
    return 1 << (need - 1).bit_length()


@dataclass(frozen=True, slots=True)
class ShmLayout:
    """Geometry of one session's region. Both sides hold a private, validated copy."""

    size_c2s: int
    size_s2c: int
    max_record: int

    def __post_init__(self) -> None:
        # RingSpec validates sizes (power of two, bounds) and that a max record fits.
        self.ring_spec(CLIENT_TO_SERVER)
        self.ring_spec(SERVER_TO_CLIENT)

    @property
    def total(self) -> int:
        """Bytes the memfd must have."""
        return SHM_DATA_OFFSET + self.size_c2s + self.size_s2c

    def ring_spec(self, direction: int) -> RingSpec:
        """Where ring ``direction`` (CLIENT_TO_SERVER or SERVER_TO_CLIENT) lives."""
        if direction == CLIENT_TO_SERVER:
            size, data = self.size_c2s, SHM_DATA_OFFSET
        elif direction == SERVER_TO_CLIENT:
            size, data = self.size_s2c, SHM_DATA_OFFSET + self.size_c2s
        else:
            raise RingError(f"ring direction {direction} is neither 0 nor 1")
        return RingSpec(
            size=size,
            max_record=self.max_record,
            ctrl_offset=_CTRL_BASE + direction * RING_CTRL_SIZE,
            data_offset=data,
        )

    def initialise(self, buffer: Any, *, initial_index: int = 0) -> None:
        """Write the header and reset both rings (creator side only)."""
        cbuf = ffi.from_buffer(buffer, require_writable=True)
        try:
            if len(cbuf) < self.total:
                raise RingError(
                    f"region of {len(cbuf)} bytes is smaller than the layout ({self.total})"
                )
            header = ffi.cast("struct pcisplit_shm_header *", cbuf)
            header.magic = SHM_MAGIC
            header.version = SHM_VERSION
            header.ring_size[0] = self.size_c2s
            header.ring_size[1] = self.size_s2c
            header.max_record = self.max_record
        finally:
            ffi.release(cbuf)
        for direction in (CLIENT_TO_SERVER, SERVER_TO_CLIENT):
            initialise_ring(buffer, self.ring_spec(direction), initial_index=initial_index)
