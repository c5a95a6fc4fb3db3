"""Bad arguments to the Device API raise pcifront errors before anything is sent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

import pcifront
from pcifront import Bus, Device
from shared.errors import ErrorCode

Call = Callable[[Device], Awaitable[object]]


@pytest.mark.parametrize(
    ("call", "error", "code"),
    [
        (lambda d: d.config_read(0x1000, 4), pcifront.InvalidAccessError, ErrorCode.INVALID_OFFSET),
        (lambda d: d.config_read(-1, 4), pcifront.InvalidAccessError, ErrorCode.INVALID_OFFSET),
        (lambda d: d.config_read(0x10, 3), pcifront.InvalidAccessError, ErrorCode.INVALID_SIZE),
        (lambda d: d.config_write(0x10, 8, 0), pcifront.InvalidAccessError, ErrorCode.INVALID_SIZE),
        (lambda d: d.bar_read(0, 0, 3), pcifront.InvalidAccessError, ErrorCode.INVALID_SIZE),
        (lambda d: d.bar_read(9, 0, 4), pcifront.DeviceNotFoundError, ErrorCode.NOT_FOUND),
    ],
)
async def test_bad_arguments_are_typed_and_never_sent(
    pcisplit_bus: Bus, call: Call, error: type[pcifront.RequestError], code: ErrorCode
) -> None:
    dev = pcisplit_bus.devices[0]
    sent = pcisplit_bus.statistics().requests_sent
    with pytest.raises(error) as info:
        await call(dev)
    assert info.value.code is code
    assert pcisplit_bus.statistics().requests_sent == sent
    # The connection is unharmed.
    assert await dev.config_read(0, 2) == 0x1234
