"""The blocking guest API: the same bus, called without ``await`` and without trio.

    from pcifront import blocking

    with blocking.connect("shm:/run/pciback.sock", guest="guest0") as bus:
        dev = bus.devices[0]
        vendor = dev.config_read(0, 2)
        with dev.interrupts(mode="msi") as irqs:
            irq = irqs.receive(timeout=1.0)

The protocol core (:class:`shared.protocol.Connection`) is sans-I/O, so this
client drives the very same connection object as :func:`pcifront.connect`
from the calling thread, the way one h11 serves both sync and async HTTP
clients. The transports are the blocking twins of the trio ones
(:func:`shared.transport.open_blocking_transport`): ``unix:``, ``shm:``,
``tcp://`` and ``tls://``. On ``shm:``, ``poll_us=`` spins on the ring for
that long after each message before sleeping on the doorbell (the spin runs
in C with the GIL released).

There is no background task: whatever the backend sends on its own
(interrupts, DMA calls, faults) is handled while a call waits for its reply
or while :meth:`Interrupts.receive` waits. Interrupts travel in band on every
transport. One thread talks at a time: calls from several threads are
serialised by a lock.
"""

from pcifront.client.blocking import (
    BLOCKING_FEATURES,
    Bus,
    Device,
    Interrupts,
    ReceiveTimeoutError,
    connect,
)

__all__ = [
    "connect",
    "Bus",
    "Device",
    "Interrupts",
    "ReceiveTimeoutError",
    "BLOCKING_FEATURES",
]
