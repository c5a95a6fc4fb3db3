"""Small trio synchronisation primitives the hot paths of both sides share.

* :class:`FastLock`: a lock that takes no checkpoint when it is free.
* :class:`CallTable`: outstanding calls by id, with bounded slots, waiting
  for a result, and failing them all at once. The frontend's requests and the
  backend's DMA calls are the same idea, written once here.
* :class:`ConflictDetector` (and :class:`ThreadConflictDetector` for
  threads): the one "one sender / one receiver at a time" rule of every
  transport and port, raising :class:`trio.BusyResourceError`.
"""

from shared.sync._calls import Call, CallTable
from shared.sync._conflict import ConflictDetector, ThreadConflictDetector
from shared.sync._lock import FastLock

__all__ = ["Call", "CallTable", "ConflictDetector", "FastLock", "ThreadConflictDetector"]
