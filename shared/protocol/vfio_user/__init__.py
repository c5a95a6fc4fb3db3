"""The vfio-user protocol, sans-I/O: a codec and connection for both roles.

Written from the vfio-user specification (version 0.9.2 and QEMU's current
text). Messages are frozen, validated dataclasses; :class:`VfioUserConnection`
reassembles the byte stream, attributes file descriptors to messages, keeps the
VERSION handshake and the outstanding commands, and raises
:class:`MalformedMessageError` (one bad message; answer it with its errno) or
:class:`StreamBrokenError` (disconnect) for hostile input. Nothing here does
I/O. See ``docs/vfio-user.md``.
"""

from shared.protocol.vfio_user._bodies import *  # noqa: F403
from shared.protocol.vfio_user._bodies import __all__ as _bodies_all
from shared.protocol.vfio_user._caps import *  # noqa: F403
from shared.protocol.vfio_user._caps import __all__ as _caps_all
from shared.protocol.vfio_user._connection import *  # noqa: F403
from shared.protocol.vfio_user._connection import __all__ as _connection_all
from shared.protocol.vfio_user._irqs import *  # noqa: F403
from shared.protocol.vfio_user._irqs import __all__ as _irqs_all
from shared.protocol.vfio_user._transfer import *  # noqa: F403
from shared.protocol.vfio_user._transfer import __all__ as _transfer_all
from shared.protocol.vfio_user._wire import *  # noqa: F403
from shared.protocol.vfio_user._wire import SERVER_COMMANDS
from shared.protocol.vfio_user._wire import __all__ as _wire_all

__all__ = [
    *_wire_all, *_caps_all, *_bodies_all, *_irqs_all, *_transfer_all, *_connection_all,
    "SERVER_COMMANDS",
]
