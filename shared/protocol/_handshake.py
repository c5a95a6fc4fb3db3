"""The handshake, apart from the connection (as wsproto keeps ``handshake.py``).

A :class:`Handshake` holds what the two sides say to each other before a
connection is OPEN - the Hello, the Welcome or HandshakeRejected, the
versions, features and guest - and the rules those messages obey. It does no
state-machine work and no I/O: :class:`~shared.protocol.Connection` asks it
whether a Hello or Welcome may pass (in either direction) and tells it when
one did. Each rule is written once and holds for both ends; the connection
decides whose fault a broken rule is (``LocalProtocolError`` when we were
about to send it, ``RemoteProtocolError`` when the peer did).

Negotiation: the Welcome carries the frontend's major version, the lower of
both minors, the features both sides support (in the frontend's order), the
backend's limits and the guest the frontend asked for.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.errors import ErrorCode, LocalProtocolError
from shared.protocol._messages import HandshakeRejected, Hello, Limits, Welcome
from shared.protocol._schema import MAX_TEXT_LEN
from shared.protocol._state import Role

__all__ = ["Handshake", "version_mismatch_message", "clip_text"]


def version_mismatch_message(frontend: tuple[int, int], backend: tuple[int, int]) -> str:
    """The text both sides show when the major versions differ. Names both versions."""
    (fmaj, fmin), (bmaj, bmin) = frontend, backend
    if fmaj > bmaj:
        advice = (
            f"upgrade the backend (pciback) to a release that speaks {fmaj}.x, "
            f"or use a frontend that speaks {bmaj}.x"
        )
    else:
        advice = (
            f"upgrade the frontend (pcifront) to a release that speaks {bmaj}.x, "
            f"or use a backend that speaks {fmaj}.x"
        )
    return (
        f"protocol version mismatch: frontend speaks {fmaj}.{fmin}, backend speaks "
        f"{bmaj}.{bmin}; no common major version: {advice}"
    )


def clip_text(text: str, limit: int = MAX_TEXT_LEN) -> str:
    """``text`` cut to ``limit`` characters (wire texts are bounded; a long diagnostic is cut)."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


class Handshake:
    """What one end knows about the handshake, and the rules of Hello and Welcome.

    ``local_version`` is the version this end speaks, ``offered`` the
    features it supports, ``guest`` the guest a frontend asks to act as (a
    backend learns it from the Hello).
    """

    __slots__ = ("features", "guest", "hello", "local_version", "offered", "rejection", "version")

    def __init__(
        self, *, local_version: tuple[int, int], offered: tuple[str, ...], guest: str | None
    ) -> None:
        self.local_version = local_version
        self.offered = offered
        #: The guest this connection acts for: requested (client) / claimed (server).
        self.guest = guest
        #: The Hello of this connection, whichever end sent it.
        self.hello: Hello | None = None
        #: The negotiated version and features, once a Welcome passed.
        self.version: tuple[int, int] | None = None
        self.features: tuple[str, ...] = ()
        #: The HandshakeRejected the backend sent, if it refused.
        self.rejection: HandshakeRejected | None = None

    # ------------------------------------------------------------------ building messages

    def make_hello(self, limits: Limits, token: bytes = b"") -> Hello:
        """CLIENT: our Hello: our version, features, limits, guest and token."""
        if self.guest is None:
            raise LocalProtocolError(
                "a frontend Connection needs guest=... to say which guest it acts as"
            )
        major, minor = self.local_version
        return Hello(major, minor, self.offered, limits, self.guest, token)

    def version_problem(self) -> str | None:
        """SERVER, after the Hello: None if the versions are compatible, else why not."""
        hello = self.hello
        if hello is None:
            raise LocalProtocolError("check_version() needs the frontend's Hello first")
        if hello.version_major == self.local_version[0]:
            return None
        return version_mismatch_message(
            (hello.version_major, hello.version_minor), self.local_version
        )

    def make_welcome(self, features: Iterable[str] | None, limits: Limits) -> Welcome:
        """SERVER: the Welcome that answers the Hello (negotiated as the module says)."""
        hello = self.hello
        if hello is None:
            raise LocalProtocolError("accept() is for a backend that has received a Hello")
        ours = set(self.offered if features is None else features)
        granted = tuple(f for f in hello.features if f in ours)
        minor = min(self.local_version[1], hello.version_minor)
        return Welcome(hello.version_major, minor, granted, limits, hello.guest)

    def make_rejection(self, code: ErrorCode, message: str) -> HandshakeRejected:
        """SERVER: refuse the Hello, carrying our own version so the frontend can say why."""
        major, minor = self.local_version
        return HandshakeRejected(code, clip_text(message), major, minor)

    # ------------------------------------------------------------------ the rules

    def hello_problem(self, hello: Hello) -> str | None:
        """Why ``hello`` may not pass on this connection (None if it may)."""
        if self.guest is not None and hello.guest != self.guest:
            return f"Hello names guest {hello.guest!r} but this connection is for {self.guest!r}"
        return None

    def welcome_problem(self, role: Role, welcome: Welcome) -> str | None:
        """Why ``welcome`` may not answer this connection's Hello (None if it may).

        One rule for both ends: the same major as the Hello (and one the
        backend speaks), a minor no newer than both sides speak, only
        features the frontend offered, and the guest it asked for.
        """
        hello = self.hello
        if hello is None:  # the state table allows a Welcome only after a Hello
            return "a Welcome answers a Hello, and there was none"
        offered = (hello.version_major, hello.version_minor)
        if role is Role.SERVER:
            problem = self.version_problem()
            if problem is not None:
                return f"cannot accept this frontend: {problem}"
        if welcome.version_major != hello.version_major:
            return version_mismatch_message(offered, (welcome.version_major, welcome.version_minor))
        best_minor = hello.version_minor
        if role is Role.SERVER:
            best_minor = min(best_minor, self.local_version[1])
        if welcome.version_minor > best_minor:
            return (
                f"the Welcome offers version {welcome.version_major}.{welcome.version_minor}, "
                f"newer than the frontend's Hello and the backend allow: the negotiated version "
                f"is at most {hello.version_major}.{best_minor}"
            )
        extra = set(welcome.features) - set(hello.features)
        if extra:
            return f"the Welcome grants features the frontend did not offer: {sorted(extra)}"
        if welcome.guest != hello.guest:
            return (
                f"the Welcome names guest {welcome.guest!r}, but the frontend asked for "
                f"{hello.guest!r}"
            )
        return None

    # ------------------------------------------------------------------ recording

    def on_hello(self, hello: Hello, *, sent: bool) -> None:
        """A Hello passed (sent by us, or received)."""
        self.hello = hello
        self.guest = hello.guest
        if sent:
            # What we announce is what we negotiate from.
            self.offered = hello.features
            self.local_version = (hello.version_major, hello.version_minor)

    def on_welcome(self, welcome: Welcome) -> None:
        """A Welcome passed: the handshake succeeded."""
        self.version = (welcome.version_major, welcome.version_minor)
        self.features = welcome.features

    def on_rejection(self, rejection: HandshakeRejected) -> None:
        """A HandshakeRejected passed: the handshake failed."""
        self.rejection = rejection
