"""Fuzz target: the vfio-user connection (``shared.protocol.vfio_user``), both roles.

The first byte picks the role (a fresh server, a server after the handshake,
or a client after it) and how the rest is cut into reads; every read brings a
descriptor number with it. Any bytes must give messages or the codec's typed
errors (``MalformedMessageError``, ``StreamBrokenError``); every descriptor
handed in must come out exactly once (on a message, on an error, or held for
the caller to close); and every decoded payload must re-encode stably.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import instrumented

with instrumented(__name__, ["shared.protocol.vfio_user"]):
    from shared.protocol import vfio_user as vu


def _ready_pair() -> tuple[vu.VfioUserConnection, vu.VfioUserConnection]:
    client = vu.VfioUserConnection(vu.Role.CLIENT)
    server = vu.VfioUserConnection(vu.Role.SERVER)
    _, data = client.send_command(vu.Version(0, 0, client.advertised(
        vu.Capabilities(write_multiple=True))))
    server.receive_data(data)
    proposal = server.next_event()
    assert proposal is not None and isinstance(proposal.body, vu.Version)
    reply = vu.negotiate(proposal.body, server.advertised(vu.Capabilities(write_multiple=True)))
    client.receive_data(server.send_reply(proposal.header, reply))
    client.next_event()
    # Replies the client can match: a few commands outstanding.
    for cmd_body in (vu.RegionAccess(7, 0, 4), vu.DeviceInfoRequest(), vu.RegionInfoRequest(2)):
        client.send_command(cmd_body)
    return client, server


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, stream = data[0], data[1:]
    client, server = _ready_pair()
    conn = (vu.VfioUserConnection(vu.Role.SERVER), server, client)[mode % 3]
    step = (mode >> 2) + 1
    given: list[int] = []
    out: list[int] = []
    for i in range(0, len(stream), step):
        fd = 1000 + i
        given.append(fd)
        conn.receive_data(stream[i:i + step], fds=(fd,))
        while True:
            try:
                event = conn.next_event()
            except vu.MalformedMessageError as exc:
                out.extend(exc.fds)
                continue
            except vu.StreamBrokenError as exc:
                out.extend(exc.fds)
                break
            if event is None:
                break
            out.extend(event.fds)
            body = event.body
            if body is not None:
                again = type(body).decode(body.encode(), conn.limits).encode()
                if again != body.encode():
                    raise AssertionError(f"{body!r} re-encodes unstably")
        if conn.state == "broken":
            break
    out.extend(conn.take_held_fds())
    if sorted(out) != given:
        raise AssertionError(f"descriptors lost or duplicated: in {given}, out {sorted(out)}")


if __name__ == "__main__":
    from _common import run

    run(test_one_input)
