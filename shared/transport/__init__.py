"""Frame transports behind one small interface, chosen by address strings."""

from shared.transport._base import (
    DEFAULT_MAX_FRAME,
    FdPassingUnsupportedError,
    FrameListener,
    FrameTooLargeError,
    FrameTransport,
    ReceiveInterrupted,
    TransportAddressError,
    TransportConnectError,
    TransportOptions,
)
from shared.transport._blocking import (
    BLOCKING_SCHEMES,
    BlockingShmTransport,
    BlockingStreamTransport,
    BlockingTransport,
    open_blocking_transport,
)
from shared.transport._budget import BudgetStatistics, ReceiveBudget, ReceiveLimits
from shared.transport._fdpass import MAX_FDS_PER_FRAME
from shared.transport._identity import PeerIdentity
from shared.transport._memory import MemoryListener, MemoryTransport, memory_transport_pair
from shared.transport._registry import (
    ENTRY_POINT_GROUP,
    TransportScheme,
    available_schemes,
    get_scheme,
    open_listener,
    open_transport,
    register_transport,
    split_address,
)
from shared.transport._stream import StreamFrameTransport, UnixFrameTransport

__all__ = [
    "BLOCKING_SCHEMES",
    "BlockingShmTransport",
    "BlockingStreamTransport",
    "BlockingTransport",
    "open_blocking_transport",
    "DEFAULT_MAX_FRAME",
    "FdPassingUnsupportedError",
    "MAX_FDS_PER_FRAME",
    "PeerIdentity",
    "ReceiveInterrupted",
    "FrameListener",
    "FrameTooLargeError",
    "FrameTransport",
    "TransportAddressError",
    "TransportConnectError",
    "TransportOptions",
    "ReceiveBudget",
    "ReceiveLimits",
    "BudgetStatistics",
    "MemoryListener",
    "MemoryTransport",
    "memory_transport_pair",
    "ENTRY_POINT_GROUP",
    "TransportScheme",
    "available_schemes",
    "get_scheme",
    "open_listener",
    "open_transport",
    "register_transport",
    "split_address",
    "StreamFrameTransport",
    "UnixFrameTransport",
]
