"""A connection acts only as a guest it can prove: credentials, certificates, tokens."""

from __future__ import annotations

import errno
import grp
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio

import pcifront
from pciback.config import GuestConfig, parse_config
from pciback.guests.identity import authorize
from pciback.ops.control_client import ControlUnreachableError
from pciback.ops.control_client import request as ctl_request
from pciback.service import Backend
from pciback.testing import TEST_TOKEN, running_backend
from shared.errors import ConfigFileError, ErrorCode
from shared.protocol import Connection, HandshakeRejected, Limits, Role, Welcome
from shared.protocol._framing import FrameDecoder, encode_frame
from shared.transport import PeerIdentity, TransportOptions
from shared.transport._identity import SO_PEERGROUPS, peer_groups, peercred_identity
from tests.support.configs import edu_config
from tests.support.tls import TlsFiles

NOBODY = 65534


def _peer(uid: int, gid: int) -> PeerIdentity:
    return PeerIdentity("unix:/x(peer)", uid=uid, gid=gid, pid=1)


# --------------------------------------------------------------------------- the rules


def test_credentials_match_listed_uid_or_gid() -> None:
    guest = GuestConfig("g", uids=(1000,), gids=(2000,))
    assert authorize(guest, _peer(1000, 5), scheme="unix", token=b"") is None
    assert authorize(guest, _peer(7, 2000), scheme="unix", token=b"") is None
    refusal = authorize(guest, _peer(7, 5), scheme="unix", token=b"", service_uid=0)
    assert refusal is not None and refusal.code is ErrorCode.NOT_AUTHORIZED
    assert "uid 1000 or gid 2000" in refusal.message and "uid 7 gid 5" in refusal.message
    # Root is not special once the guest names its users.
    assert authorize(guest, _peer(0, 0), scheme="unix", token=b"", service_uid=0) is not None


def test_supplementary_groups_match_gid_too() -> None:
    guest = GuestConfig("g", gids=(2000,))
    member = PeerIdentity("unix:/x(peer)", uid=7, gid=5, pid=1, groups=(1500, 2000))
    assert authorize(guest, member, scheme="unix", token=b"", service_uid=0) is None
    stranger = PeerIdentity("unix:/x(peer)", uid=7, gid=5, pid=1, groups=(1500,))
    refusal = authorize(guest, stranger, scheme="unix", token=b"", service_uid=0)
    assert refusal is not None and "uid 7 gid 5 groups 1500;" in refusal.message
    assert "groups 1500" in stranger.describe()
    # A group never stands in for a uid: a guest listing only uids ignores groups.
    only_uid = GuestConfig("g", uids=(2000,))
    assert authorize(only_uid, member, scheme="unix", token=b"", service_uid=0) is not None


class _NoPeerGroups:
    """A socket of a kernel without SO_PEERGROUPS (before Linux 4.13)."""

    def getsockopt(self, level: int, option: int, buflen: int = 0) -> bytes:
        if option == SO_PEERGROUPS:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return struct.pack("3i", 42, 1000, 1000)


def test_without_so_peergroups_only_the_effective_gid_counts() -> None:
    peer = peercred_identity(_NoPeerGroups(), "unix:/x(peer)")
    assert (peer.uid, peer.gid, peer.groups) == (1000, 1000, ())
    assert authorize(GuestConfig("g", gids=(1000,)), peer, scheme="unix", token=b"") is None
    refusal = authorize(GuestConfig("g", gids=(2000,)), peer, scheme="unix", token=b"")
    assert refusal is not None and "uid 1000 gid 1000;" in refusal.message


def test_peer_groups_of_a_socketpair_are_this_process_groups() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert set(peer_groups(left)) == set(os.getgroups())
        assert peercred_identity(left, "pair").gid == os.getegid()


def test_guest_without_ids_is_reachable_by_root_and_the_service_uid_only() -> None:
    guest = GuestConfig("g")
    assert authorize(guest, _peer(0, 0), scheme="shm", token=b"", service_uid=999) is None
    assert authorize(guest, _peer(999, 1), scheme="shm", token=b"", service_uid=999) is None
    refusal = authorize(guest, _peer(NOBODY, NOBODY), scheme="shm", token=b"", service_uid=999)
    assert refusal is not None and "add uid = 65534" in refusal.message


def test_certificate_names_compare_case_insensitively() -> None:
    guest = GuestConfig("Guest0")
    peer = PeerIdentity("tls", cert_names=("other", "GUEST0"))
    assert authorize(guest, peer, scheme="tls", token=b"") is None
    other = PeerIdentity("tls", cert_names=("guest01",))
    refusal = authorize(guest, other, scheme="tls", token=b"")
    assert refusal is not None and "'guest01'" in refusal.message
    refusal = authorize(guest, PeerIdentity("tls"), scheme="tls", token=b"")
    assert refusal is not None and "no name" in refusal.message


def test_tokens_must_match_and_must_exist() -> None:
    guest = GuestConfig("g", token=b"s" * 32)
    assert authorize(guest, PeerIdentity("tcp"), scheme="tcp", token=b"s" * 32) is None
    for wrong in (b"", b"s" * 31, b"s" * 31 + b"t", b"s" * 33):
        refusal = authorize(guest, PeerIdentity("tcp"), scheme="tcp", token=wrong)
        assert refusal is not None and "wrong or missing token" in refusal.message
    refusal = authorize(GuestConfig("g"), PeerIdentity("vsock"), scheme="vsock", token=b"x" * 32)
    assert refusal is not None and "has no token_file" in refusal.message


def test_guest_config_repr_never_shows_the_token() -> None:
    assert "sss" not in repr(GuestConfig("g", token=b"s" * 32))


# --------------------------------------------------------------------------- the config


def _write_token(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text + "\n")
    path.chmod(mode)


def test_identity_keys_parse_with_lists_and_relative_token_files(tmp_path: Path) -> None:
    _write_token(tmp_path / "g.token", "t" * 20)
    cfg = parse_config(
        "[[guest]]\nname='a'\nuid=1000\ngid=[10, 20]\n"
        "[[guest]]\nname='b'\ntoken_file='g.token'\n",
        base=tmp_path,
    )
    assert (cfg.guests["a"].uids, cfg.guests["a"].gids) == ((1000,), (10, 20))
    assert cfg.guests["b"].token == b"t" * 20
    assert cfg.guests["b"].token_file == tmp_path / "g.token"


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("t" * 20, 0o644, "guest[0].token_file: token file .* is readable by every user"),
        ("short", 0o600, "guest[0].token_file: token file .* must hold one line of 16-256"),
    ],
)
def test_bad_token_files_are_refused(tmp_path: Path, text: str, mode: int, message: str) -> None:
    _write_token(tmp_path / "g.token", text, mode)
    with pytest.raises(ConfigFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config("[[guest]]\nname='g'\ntoken_file='g.token'\n", base=tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[guest]]\nname='g'\nuid='root'", "guest[0].uid: expected a numeric uid"),
        ("[[guest]]\nname='g'\ngid=[1, -1]", "guest[0].gid[1]: expected a numeric gid"),
        ("[[guest]]\nname='g'\ntoken_file='missing'", "guest[0].token_file: cannot read"),
        ("[[guest]]\nname='g'\nbus='flat'", "guest[0].bus: 'flat' is not one of"),
    ],
)
def test_bad_identity_keys_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigFileError) as info:
        parse_config(text, base=tmp_path)
    assert message in str(info.value)


def test_tls_listener_without_ca_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"^tls.ca: the tls:// listener tls://0.0.0.0:7071"):
        parse_config(
            "listen=['tls://0.0.0.0:7071']\n[tls]\ncert='c.pem'\nkey='k.pem'\n", base=tmp_path
        )
    with pytest.raises(ConfigFileError, match="needs a \\[tls\\] table"):
        parse_config("listen=['tls://0.0.0.0:7071']\n", base=tmp_path)
    # An extra --listen address gets the same check when the service starts.
    config = parse_config("[tls]\ncert='c.pem'\nkey='k.pem'\n", base=tmp_path)
    with pytest.raises(ConfigFileError, match=r"tls\.ca"):
        Backend(config, extra_listen=["tls://127.0.0.1:0"])


# --------------------------------------------------------------------------- end to end


async def test_token_mismatch_is_refused_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "[[guest]]\nname='guest0'\n[[device]]\nid='e'\nmodel='edu'\nguest='guest0'\n"
    async with running_backend(text, transports=("tcp",), tmp=tmp_path) as rb:
        for wrong in (None, b"not-the-token-at-all"):
            with pytest.raises(pcifront.HandshakeError) as info:
                async with pcifront.connect(rb.address("tcp"), guest="guest0", token=wrong):
                    pass
            assert info.value.code is ErrorCode.NOT_AUTHORIZED
        async with pcifront.connect(rb.address("tcp"), guest="guest0", token=TEST_TOKEN) as bus:
            assert bus.devices[0].device_id == 0x11E8
        assert rb.backend.stats.handshakes_rejected == 2
    refusals = [r for r in caplog.records if "handshake refused (NOT_AUTHORIZED)" in r.message]
    assert len(refusals) == 2 and all("127.0.0.1" in r.message for r in refusals)
    assert not any(TEST_TOKEN.decode() in r.message for r in caplog.records)


async def test_unknown_guest_and_not_authorized_are_told_apart_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "[[guest]]\nname='guest0'\nuid=4242\n"
    async with running_backend(text, transports=("unix",), tmp=tmp_path) as rb:
        codes = []
        for guest in ("mallory", "guest0"):
            with pytest.raises(pcifront.HandshakeError) as info:
                async with pcifront.connect(rb.address("unix"), guest=guest):
                    pass
            codes.append(info.value.code)
        assert codes == [ErrorCode.UNKNOWN_GUEST, ErrorCode.NOT_AUTHORIZED]
        assert rb.backend.stats.handshakes_rejected == 2
    logged = [r for r in caplog.records if "handshake refused" in r.getMessage()]
    assert [r.levelname for r in logged] == ["WARNING", "WARNING"]
    unknown, unauthorized = (r.getMessage() for r in logged)
    assert "(UNKNOWN_GUEST) for guest 'mallory'" in unknown
    assert "(NOT_AUTHORIZED) for guest 'guest0'" in unauthorized
    assert f"pid {os.getpid()} uid {os.geteuid()}" in unauthorized
    assert "accepts only uid 4242" in unauthorized


async def test_tls_certificate_name_is_case_insensitive(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    client = tls_files.client_context("GUEST0.example", common_name="Guest0")
    text = tls_files.section + edu_config(["guest0"], {"e": "guest0"})
    async with running_backend(text, transports=("tls",), tmp=tmp_path) as rb:
        opts = TransportOptions(ssl_context=client)
        async with pcifront.connect(rb.address("tls"), guest="guest0", options=opts) as bus:
            assert len(bus.devices) == 1


# --------------------------------------------------------------------------- another uid


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory another uid can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="pcisplit-ident-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _handshake_as(uid: int, path: str, guest: str) -> str:
    """In a forked child running as ``uid``: handshake as ``guest`` (sans-I/O, blocking)."""
    conn = Connection(Role.CLIENT, limits=Limits(), guest=guest)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(encode_frame(conn.hello()))
        decoder = FrameDecoder(1 << 20)
        while (frame := decoder.next_frame()) is None:
            data = sock.recv(65536)
            if not data:
                return "EOF"
            decoder.feed(data)
    reply = conn.receive(frame)
    if isinstance(reply, Welcome):
        return "WELCOME"
    assert isinstance(reply, HandshakeRejected)
    return reply.code.name


def _control_as(uid: int, path: str, guest: str) -> str:
    """In a forked child running as ``uid``: ask the control socket for ``status``
    the way ``pciback ctl`` does."""
    try:
        answer = ctl_request(Path(path), {"command": "status"}, timeout=10)
    except ControlUnreachableError as exc:
        if isinstance(exc.__cause__, PermissionError):
            return "EACCES"
        raise
    return "ok" if answer["ok"] else str(answer["code"])


async def _in_child_as(
    uid: int,
    path: str,
    guest: str,
    groups: Sequence[int] = (),
    action: Callable[[int, str, str], str] = _handshake_as,
) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges for good, then try; never return to pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(uid)
            os.setuid(uid)
            os.write(write_end, action(uid, path, guest).encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent through the pipe
            os.write(write_end, f"child failed: {exc!r}".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to fork a process with another uid")
@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_another_uid_cannot_act_as_a_root_guest_but_can_act_as_its_own(
    kind: str, world_dir: Path
) -> None:
    text = (
        "listen_mode = '0666'\n"
        "[[guest]]\nname='rootguest'\n"
        f"[[guest]]\nname='nobodyguest'\nuid={NOBODY}\n"
        "[[device]]\nid='a'\nmodel='edu'\nguest='rootguest'\n"
        "[[device]]\nid='b'\nmodel='edu'\nguest='nobodyguest'\n"
    )
    async with running_backend(text, transports=(kind,), tmp=world_dir) as rb:
        path = rb.address(kind).split(":", 1)[1]
        assert os.stat(path).st_mode & 0o777 == 0o666
        assert await _in_child_as(NOBODY, path, "rootguest") == "NOT_AUTHORIZED"
        assert await _in_child_as(NOBODY, path, "nobodyguest") == "WELCOME"
        # And root, the backend's own uid, may still act as the root-only guest.
        async with pcifront.connect(rb.address(kind), guest="rootguest") as bus:
            assert len(bus.devices) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to fork a process with other groups")
@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_a_supplementary_group_proves_a_gid_guest(
    kind: str, world_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    many = list(range(20000, 20300))  # more than the 256 Python's getsockopt can read
    text = (
        "listen_mode = '0666'\n"
        "[[guest]]\nname='team'\ngid=4343\n"
        "[[guest]]\nname='crowd'\ngid=20299\n"
        "[[device]]\nid='a'\nmodel='edu'\nguest='team'\n"
        "[[device]]\nid='b'\nmodel='edu'\nguest='crowd'\n"
    )
    async with running_backend(text, transports=(kind,), tmp=world_dir) as rb:
        path = rb.address(kind).split(":", 1)[1]
        # Effective gid 65534; 4343 only as a supplementary group.
        assert await _in_child_as(NOBODY, path, "team", groups=[4242, 4343]) == "WELCOME"
        assert await _in_child_as(NOBODY, path, "team", groups=[4242]) == "NOT_AUTHORIZED"
        assert await _in_child_as(NOBODY, path, "team") == "NOT_AUTHORIZED"
        assert await _in_child_as(NOBODY, path, "crowd", groups=many) == "WELCOME"
        assert await _in_child_as(NOBODY, path, "crowd", groups=many[:-1]) == "NOT_AUTHORIZED"
    # Every refusal is logged with what the kernel said about the peer.
    refusals = [
        r.getMessage() for r in caplog.records
        if "handshake refused (NOT_AUTHORIZED) for guest 'team'" in r.getMessage()
    ]
    assert len(refusals) == 2
    assert all(f"uid {NOBODY} gid {NOBODY}" in m and " pid " in m for m in refusals)
    assert "groups 4242" in refusals[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to fork a process with another uid")
async def test_the_control_socket_answers_root_and_the_service_uid_only(world_dir: Path) -> None:
    from pciback.ops.control_server import serve_control

    config = parse_config(f"listen = ['unix:{world_dir / 'b.sock'}']\n[[guest]]\nname='g'\n")
    backend = Backend(config)
    ctl = world_dir / "pciback.ctl"
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        await nursery.start(serve_control, backend, ctl)
        assert os.stat(ctl).st_mode & 0o777 == 0o600
        assert await _in_child_as(NOBODY, str(ctl), "", action=_control_as) == "EACCES"
        ctl.chmod(0o666)  # an operator loosened the mode: the peer check still holds
        assert await _in_child_as(NOBODY, str(ctl), "", action=_control_as) == "NOT_AUTHORIZED"
        assert await trio.to_thread.run_sync(_control_as, 0, str(ctl), "") == "ok"
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- socket files


def _some_group() -> grp.struct_group:
    """A group of this host other than root's, to hand the socket file to."""
    groups = [g for g in grp.getgrall() if g.gr_gid != 0]
    if not groups:
        pytest.skip("this host has no group besides root's")
    return groups[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another group")
@pytest.mark.parametrize("by", ["name", "number"])
@pytest.mark.parametrize("kind", ["unix", "shm"])
async def test_listen_mode_and_group_set_the_socket_file(
    kind: str, by: str, tmp_path: Path
) -> None:
    group = _some_group()
    value = repr(group.gr_name) if by == "name" else str(group.gr_gid)
    text = f"listen_mode = '0660'\nlisten_group = {value}\n[[guest]]\nname='g'\n"
    async with running_backend(text, transports=(kind,), tmp=tmp_path) as rb:
        st = os.stat(rb.address(kind).split(":", 1)[1])
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, group.gr_gid)


async def test_listen_mode_defaults_to_0600_and_never_widens_the_control_socket(
    tmp_path: Path,
) -> None:
    from pciback.ops.control_server import serve_control

    for mode, expected in (("", 0o600), ("listen_mode = '0666'\n", 0o666)):
        config = parse_config(f"listen = ['unix:{tmp_path / 'b.sock'}']\n{mode}")
        backend = Backend(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            await nursery.start(serve_control, backend, tmp_path / "ctl")
            assert os.stat(tmp_path / "b.sock").st_mode & 0o777 == expected
            assert os.stat(tmp_path / "ctl").st_mode & 0o777 == 0o600
            nursery.cancel_scope.cancel()


def test_a_group_that_does_not_exist_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigFileError, match=r"^listen_group: no group named 'no-such-grp'"):
        parse_config("listen_group = 'no-such-grp'\n")
    with pytest.raises(ConfigFileError, match=r"^listen_group: expected a group name or number"):
        parse_config("listen_group = -1\n")
