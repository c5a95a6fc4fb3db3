"""Shared test data for the protocol tests: one sample per message type, and
hypothesis strategies that build arbitrary *valid* messages."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from shared.errors import ErrorCode
from shared.protocol import (
    FUNCTION_MASK_VECTOR,
    IRQ_MODE_INTX,
    IRQ_MODE_MSI,
    IRQ_MODE_MSIX,
    MAX_DMA_CHUNK,
    MAX_DMA_WINDOW,
    MAX_MSIX_VECTORS,
    U16,
    U32,
    U64,
    BarReadRequest,
    BarWriteRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    Connection,
    DeviceAddedEvent,
    DeviceChangeAck,
    DeviceInfo,
    DeviceRemovedEvent,
    DmaCallResult,
    DmaFaultEvent,
    DmaMapRequest,
    DmaReadCall,
    DmaUnmapRequest,
    DmaWriteCall,
    DoneReply,
    ErrorReply,
    Goodbye,
    HandshakeRejected,
    Hello,
    InterruptDisableRequest,
    InterruptEnableRequest,
    InterruptEoiRequest,
    InterruptEvent,
    InterruptMaskRequest,
    Limits,
    Message,
    PingRequest,
    ResetRequest,
    Role,
    SnapshotReply,
    SnapshotRequest,
    ValueReply,
    Welcome,
)

DEVICE = DeviceInfo(0x0000_0008, 0x1234, 0x11E8, 0x00FF00, 0x10, 0x00, 0x1AF4, 0x1100)

#: One valid instance of every message type (a test checks the list is complete).
SAMPLES: list[Message] = [
    Hello(1, 0, ("batch", "events"), Limits(65536, 64), "guest0"),
    Welcome(1, 0, ("events",), Limits(1 << 20, 128), "guest0"),
    HandshakeRejected(ErrorCode.UNKNOWN_GUEST, "no guest 'x' in the config", 1, 0),
    Goodbye(ErrorCode.OK, ""),
    PingRequest(0),
    SnapshotRequest(1, include_config=True),
    ConfigReadRequest(2, 0x0000_0100, 0x10, 4),
    ConfigWriteRequest(3, 0x0000_0100, 0x04, 2, 0x0406),
    BarReadRequest(4, 0x0000_0100, 0, 0x0000_0000_FFFF_FFF8, 8),
    BarWriteRequest(5, 0x0000_0100, 5, 0x20, 1, 0xFF),
    ResetRequest(U32, 0x0000_0100),
    SnapshotReply(1, (DEVICE, DeviceInfo(1, 2, 3, 4, 5, 6, 7, 8, bytes(range(256))))),
    ValueReply(2, U64),
    DoneReply(3),
    ErrorReply(4, ErrorCode.INVALID_OFFSET, "offset 0x1001 is not aligned to 2 bytes"),
    InterruptEnableRequest(6, 0x0000_0100, IRQ_MODE_MSIX, MAX_MSIX_VECTORS, eventfds=True),
    InterruptDisableRequest(7, 0x0000_0100, IRQ_MODE_MSI),
    InterruptEoiRequest(8, 0x0000_0100, 0),
    InterruptMaskRequest(9, 0x0000_0100, FUNCTION_MASK_VECTOR, True),
    DmaMapRequest(10, MAX_DMA_WINDOW, writable=False, shared=True),
    DmaUnmapRequest(11, 0x0000_0001_0000_0000),
    InterruptEvent(0x0000_0100, MAX_MSIX_VECTORS - 1, U32),
    DmaFaultEvent(0x0000_0100, U64, 100, True, "write outside every DMA window"),
    DmaReadCall(U32, 0x1000, 100),
    DmaWriteCall(0, 0x1000, bytes(range(256)) * 4),
    DmaCallResult(5, ErrorCode.OK, b"\x01\x02"),
    DeviceAddedEvent(U32, DEVICE),
    DeviceRemovedEvent(1, 0x0000_0100, "unassigned by the operator"),
    DeviceChangeAck(U32),
]


def open_pair(
    *,
    client_limits: Limits | None = None,
    server_limits: Limits | None = None,
    client_features: tuple[str, ...] = (),
    server_features: tuple[str, ...] = (),
    guest: str = "guest0",
) -> tuple[Connection, Connection]:
    """A client and a server Connection joined through bytes, handshake done."""
    client = Connection(
        Role.CLIENT, limits=client_limits or Limits(), features=client_features, guest=guest
    )
    server = Connection(Role.SERVER, limits=server_limits or Limits(), features=server_features)
    server.receive(client.hello())
    client.receive(server.accept())
    return client, server


# --------------------------------------------------------------------------- strategies

u32 = st.integers(0, U32)
u16 = st.integers(0, U16)
u64 = st.integers(0, U64)
irq_modes = st.sampled_from([IRQ_MODE_INTX, IRQ_MODE_MSI, IRQ_MODE_MSIX])
vectors = st.integers(0, MAX_MSIX_VECTORS - 1)
# Mostly small payloads (fast), sometimes exactly the largest chunk.
dma_data = st.binary(min_size=1, max_size=300) | st.just(b"\xa5" * MAX_DMA_CHUNK)
names = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=64)
features = st.lists(names, max_size=8).map(tuple)
texts = st.text(max_size=200)
codes = st.sampled_from(list(ErrorCode))
limits = st.builds(Limits, st.integers(256, 16 << 20), st.integers(1, 65536))
config_images = st.none() | st.sampled_from([64, 256, 4096]).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)
)
devices = st.builds(
    DeviceInfo,
    u32,
    u16,
    u16,
    st.integers(0, 0xFF_FFFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFF),
    u16,
    u16,
    config_images,
)


def _with_value(build: object, sizes: list[int]) -> st.SearchStrategy[Message]:
    """A write request whose value fits its access size."""

    def make(size: int) -> st.SearchStrategy[Message]:
        value = st.integers(0, (1 << (8 * size)) - 1)
        if build is ConfigWriteRequest:
            return st.builds(
                ConfigWriteRequest, u32, u32, st.integers(0, 0xFFF), st.just(size), value
            )
        return st.builds(
            BarWriteRequest, u32, u32, st.integers(0, 5), st.integers(0, U64), st.just(size), value
        )

    return st.sampled_from(sizes).flatmap(make)


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, u16, u16, features, limits, names),
    st.builds(Welcome, u16, u16, features, limits, names),
    st.builds(HandshakeRejected, codes, texts, u16, u16),
    st.builds(Goodbye, codes, texts),
    st.builds(PingRequest, u32),
    st.builds(SnapshotRequest, u32, st.booleans()),
    st.builds(ConfigReadRequest, u32, u32, st.integers(0, 0xFFF), st.sampled_from([1, 2, 4])),
    _with_value(ConfigWriteRequest, [1, 2, 4]),
    st.builds(
        BarReadRequest,
        u32,
        u32,
        st.integers(0, 5),
        st.integers(0, U64),
        st.sampled_from([1, 2, 4, 8]),
    ),
    _with_value(BarWriteRequest, [1, 2, 4, 8]),
    st.builds(ResetRequest, u32, u32),
    st.builds(SnapshotReply, u32, st.lists(devices, max_size=4).map(tuple)),
    st.builds(ValueReply, u32, st.integers(0, U64)),
    st.builds(DoneReply, u32),
    st.builds(
        ErrorReply, u32, st.sampled_from([c for c in ErrorCode if c is not ErrorCode.OK]), texts
    ),
    st.builds(
        InterruptEnableRequest,
        u32,
        u32,
        irq_modes,
        st.integers(1, MAX_MSIX_VECTORS),
        st.booleans(),
    ),
    st.builds(InterruptDisableRequest, u32, u32, irq_modes),
    st.builds(InterruptEoiRequest, u32, u32, vectors),
    st.builds(
        InterruptMaskRequest, u32, u32, vectors | st.just(FUNCTION_MASK_VECTOR), st.booleans()
    ),
    st.builds(DmaMapRequest, u32, st.integers(1, MAX_DMA_WINDOW), st.booleans(), st.booleans()),
    st.builds(DmaUnmapRequest, u32, u64),
    st.builds(InterruptEvent, u32, vectors, st.integers(1, U32)),
    st.builds(DmaFaultEvent, u32, u64, u64, st.booleans(), texts),
    st.builds(DmaReadCall, u32, u64, st.integers(1, MAX_DMA_CHUNK)),
    st.builds(DmaWriteCall, u32, u64, dma_data),
    st.builds(DmaCallResult, u32, codes, st.binary(max_size=300)),
    st.builds(DeviceAddedEvent, u32, devices),
    st.builds(DeviceRemovedEvent, u32, u32, texts),
    st.builds(DeviceChangeAck, u32),
)
