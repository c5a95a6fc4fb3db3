"""pcifront's clients: the I/O pumps around the core.

The trio client (:mod:`.bus`, public as :func:`pcifront.connect`) and the
blocking client (:mod:`.blocking`, public as :mod:`pcifront.blocking`) move
frames between a transport and the core, and turn what the core routes into
what their callers wait on: replies, ``interrupts()`` blocks, DMA buffers,
device changes (:mod:`.changes`) and reconnecting (:mod:`.reconnect`).

Layer rule: the clients import ``pcifront.core`` and ``shared``; they never
import ``pcifront.tools``. A new way to wait for something, or a new
transport pump, goes here.
"""
