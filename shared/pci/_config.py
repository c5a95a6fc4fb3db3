"""A configuration-space image with aligned 1-, 2- and 4-byte access."""

from __future__ import annotations

from shared.errors import ConfigAccessError, ErrorCode

__all__ = ["ConfigSpace", "check_access", "CONFIG_SIZES"]

#: Sizes a config space can have: legacy header only, conventional PCI, PCIe.
CONFIG_SIZES = (64, 256, 4096)
_ACCESS_SIZES = (1, 2, 4)


def check_access(
    offset: int, size: int, limit: int, *, sizes: tuple[int, ...] = _ACCESS_SIZES
) -> None:
    """Raise :class:`ConfigAccessError` unless ``offset``/``size`` is a valid access.

    Valid means: ``size`` is one of ``sizes``, ``offset`` is aligned to ``size``,
    and the access lies wholly inside ``[0, limit)``.
    """
    if size not in sizes:
        raise ConfigAccessError(
            f"access size {size} is not supported; use one of {', '.join(map(str, sizes))} bytes",
            code=ErrorCode.INVALID_SIZE,
        )
    if offset < 0 or offset + size > limit:
        raise ConfigAccessError(
            f"access at offset {offset:#x} size {size} is outside the {limit:#x}-byte space"
        )
    if offset % size:
        raise ConfigAccessError(
            f"access at offset {offset:#x} size {size} is misaligned; "
            f"offsets must be a multiple of the access size"
        )


class ConfigSpace:
    """A little-endian configuration-space image (64, 256 or 4096 bytes).

    This is plain memory: no register semantics. Device models and the policy
    engine give meaning to the bytes.
    """

    __slots__ = ("_data",)

    def __init__(self, data: bytes | bytearray | int = 4096) -> None:
        if isinstance(data, int):
            size = data
            self._data = bytearray(size)
        else:
            size = len(data)
            self._data = bytearray(data)
        if size not in CONFIG_SIZES:
            raise ConfigAccessError(
                f"config space size {size} is invalid; it must be one of {CONFIG_SIZES}"
            )

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, size: int) -> int:
        """Read an aligned 1-, 2- or 4-byte little-endian value."""
        check_access(offset, size, len(self._data))
        return int.from_bytes(self._data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Write an aligned 1-, 2- or 4-byte little-endian value."""
        check_access(offset, size, len(self._data))
        if not 0 <= value < (1 << (8 * size)):
            raise ConfigAccessError(
                f"value {value:#x} does not fit in {size} byte(s)", code=ErrorCode.INVALID_SIZE
            )
        self._data[offset : offset + size] = value.to_bytes(size, "little")

    # Unchecked helpers for models building an image; they still bound-check.
    def read_bytes(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self._data):
            raise ConfigAccessError(f"range {offset:#x}+{length} is outside the config space")
        return bytes(self._data[offset : offset + length])

    def write_bytes(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > len(self._data):
            raise ConfigAccessError(f"range {offset:#x}+{len(data)} is outside the config space")
        self._data[offset : offset + len(data)] = data

    def __bytes__(self) -> bytes:
        return bytes(self._data)

    def copy(self) -> ConfigSpace:
        return ConfigSpace(self._data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigSpace):
            return NotImplemented
        return self._data == other._data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        vid = self.read(0, 2)
        did = self.read(2, 2)
        return f"<ConfigSpace {len(self._data)} bytes {vid:04x}:{did:04x}>"
