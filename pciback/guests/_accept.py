"""The backend's accept loop: never spins, never blocks on one peer, logs once per episode.

Like trio's ``serve_listeners``, running out of file descriptors (or kernel
memory) makes ``accept`` fail with EMFILE, ENFILE, ENOMEM or ENOBUFS until
something is closed; retrying at once would spin at 100% CPU and log
megabytes a second (issue 8, stall 8). The loop instead sleeps
:data:`ACCEPT_BACKOFF` seconds between attempts, warns once when such an
episode starts and once when it ends (with how many attempts failed), and
counts both in :class:`AcceptStatistics`. An episode ends only after
:data:`EPISODE_QUIET` seconds without such a failure: while the process hovers
at its limit (one fd freed, one taken) accepts alternate between success and
failure, and that is one episode, not one log line per connection. Other
per-peer failures (an aborted connect) are counted and logged at most once a
second.

Nothing here waits on a peer: the loop only accepts and hands the transport
to ``handle`` (which starts a task), so TLS handshakes, Hellos and limits all
run in the connection's own task.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from shared.errors import reason
from shared.transport import FrameListener, FrameTransport

__all__ = ["AcceptStatistics", "accept_loop", "ACCEPT_BACKOFF", "CAPACITY_ERRNOS"]

log = logging.getLogger("pcisplit.backend")

#: Seconds between accept attempts while the process is out of fds (trio uses 0.1 s too).
ACCEPT_BACKOFF = 0.1
#: Seconds without a capacity failure before an episode counts as over.
EPISODE_QUIET = 1.0
#: accept() errors that mean "out of resources here", not "that peer failed".
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass
class AcceptStatistics:
    """``capacity_episodes``: times accepting had to pause (out of fds...);
    ``capacity_failures``: accept attempts that failed during them;
    ``peer_failures``: connections that failed inside accept (aborted connects)."""

    capacity_episodes: int = 0
    capacity_failures: int = 0
    peer_failures: int = 0


def _capacity_errno(exc: BaseException) -> int | None:
    """The errno if ``exc`` (or what it wraps) says we are out of resources."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, OSError) and candidate.errno in CAPACITY_ERRNOS:
            return candidate.errno
    return None


async def accept_loop(
    listener: FrameListener,
    handle: Callable[[FrameTransport], None],
    stats: AcceptStatistics,
    *,
    on_bug: Callable[[], None] | None = None,
) -> None:
    """Accept from ``listener`` forever, giving each transport to ``handle``.

    An unexpected exception from the listener (a plugin bug) loses that
    connection, not the service: it is counted (``on_bug``), logged with its
    traceback once per run of such failures, and the loop pauses
    :data:`ACCEPT_BACKOFF` so a listener that always fails cannot spin.
    """
    failing_since: int | None = None  # capacity_failures when the episode began
    buggy = False
    last_failure = 0.0
    last_peer_warning: float | None = None
    while True:
        try:
            transport = await listener.accept()
        except (trio.BrokenResourceError, OSError) as exc:
            code = _capacity_errno(exc)
            if code is not None:
                last_failure = trio.current_time()
                if failing_since is None:
                    failing_since = stats.capacity_failures
                    stats.capacity_episodes += 1
                    log.warning(
                        "%s: cannot accept connections: %s (%s); retrying every %.1f s until "
                        "descriptors are free (raise RLIMIT_NOFILE or lower "
                        "limits.max_connections)",
                        listener.address, errno.errorcode.get(code, code), exc, ACCEPT_BACKOFF,
                    )
                stats.capacity_failures += 1
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            stats.peer_failures += 1
            now = trio.current_time()
            if last_peer_warning is None or now - last_peer_warning >= 1.0:
                last_peer_warning = now
                log.warning(
                    "%s: a connection failed while accepting it: %s",
                    listener.address,
                    reason(exc.__cause__ or exc),
                )
            await trio.lowlevel.checkpoint()
            continue
        except Exception:
            if on_bug is not None:
                on_bug()
            if not buggy:
                log.exception(
                    "%s: the listener failed to accept a connection; still listening",
                    listener.address,
                )
            buggy = True
            await trio.sleep(ACCEPT_BACKOFF)
            continue
        buggy = False
        if failing_since is not None and trio.current_time() - last_failure >= EPISODE_QUIET:
            log.warning(
                "%s: accepting connections again after %d failed attempts",
                listener.address, stats.capacity_failures - failing_since,
            )
            failing_since = None
        handle(transport)
