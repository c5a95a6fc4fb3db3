"""pcifront's sans-I/O core: what both clients share and that does no I/O.

The protocol session of one connection (the handshake, and the routing of
every frame the backend sends to what it means for the guest), the bus and
device views read from a snapshot, the interrupt routes, the DMA space that
answers the backend's DMA calls from memory, the typed errors and the
counters. Nothing here reads a clock, opens a socket or awaits: a test drives
it with plain frames.

Layer rule: the core imports ``shared`` only; it imports no trio and nothing
of ``pcifront.client`` or ``pcifront.tools``. A new rule of the protocol as
the guest sees it (a new event, a new check) goes here, once, for both
clients.
"""
