"""Operating a running backend: the control socket and `pciback ctl`, hiding, bus views,
and reset on release on every path, each checked by content (write, leave, read back)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

import pcifront
from pciback.config import parse_config
from pciback.ops.lifecycle import reload
from pciback.service import Backend
from pciback.testing import FakeHost, listen_address
from shared.errors import ConfigFileError
from tests.support.configs import edu_config, listen_line, writable_host_config
from tests.support.inprocess import ctl, ctl_json, serving

REPO = Path(__file__).resolve().parents[2]
LIVENESS = 0x04  # edu BAR0: reads back the complement of what was written (0 at reset)
MARK = 0x12345678

CONFIG = edu_config(["alpha", "beta"], {"edu-a": "alpha", "edu-b": None})




# --------------------------------------------------------------------------- pciback ctl


async def test_control_socket_is_private(tmp_path: Path) -> None:
    async with serving(CONFIG, tmp_path):
        assert os.stat(tmp_path / "pciback.ctl").st_mode & 0o777 == 0o600
    assert not (tmp_path / "pciback.ctl").exists()


async def test_ctl_every_command_in_text_and_json(tmp_path: Path) -> None:
    async with serving(CONFIG, tmp_path) as (backend, address):
        async with pcifront.connect(address, guest="alpha"):
            status = await ctl_json(tmp_path, "status")
            assert status["result"]["guests"]["alpha"] == {"connections": 1, "devices": ["edu-a"]}
            assert status["result"]["connections"] == 1
            assert "handshakes_rejected" in status["result"]["counters"]
            code, out, _ = await ctl(tmp_path, "status")
            assert code == 0 and "guest alpha: 1 connection(s), edu-a" in out

        listing = await ctl_json(tmp_path, "list")
        rows = {row["id"]: row for row in listing["result"]}
        assert rows["edu-a"] == {
            "id": "edu-a", "provider": "emulated:edu", "owner": "alpha", "hidden": False,
            "state": "assigned", "virtual": "0000:00:00.0", "host": None, "configured": True,
            "vendor_device": "1234:11e8", "class": "00ff00", "driver": None,
        }
        assert rows["edu-b"]["state"] == "free" and rows["edu-b"]["owner"] is None
        code, out, _ = await ctl(tmp_path, "list")
        assert out.splitlines()[0].split() == [
            "ID", "PROVIDER", "OWNER", "HIDDEN", "STATE", "VIRTUAL", "HOST", "VENDOR:DEVICE",
            "CLASS", "DRIVER",
        ]
        assert out.splitlines()[1].split() == [
            "edu-a", "emulated:edu", "alpha", "no", "assigned", "0000:00:00.0", "-", "1234:11e8",
            "00ff00", "-",
        ]

        moved = await ctl_json(tmp_path, "assign", "edu-b", "alpha")
        assert moved["result"]["address"] == "0000:00:01.0"
        assert [d.id for d in backend.registry.devices_of("alpha")] == ["edu-a", "edu-b"]
        code, out, _ = await ctl(tmp_path, "unassign", "edu-b")
        assert code == 0 and out.startswith("device edu-b removed from guest alpha")

        assert (await ctl_json(tmp_path, "hide", "edu-b"))["result"]["state"] == "hidden"
        refused = await ctl_json(tmp_path, "assign", "edu-b", "beta")
        assert refused["code"] == "ACCESS_DENIED" and "hidden" in refused["error"]
        code, _, err = await ctl(tmp_path, "assign", "edu-b", "beta")
        assert code == 1 and "assign refused (ACCESS_DENIED)" in err
        assert (await ctl_json(tmp_path, "unhide", "edu-b"))["result"]["hidden"] is False
        assert (await ctl_json(tmp_path, "assign", "edu-b", "beta"))["ok"]

        assert (await ctl_json(tmp_path, "reset", "edu-a"))["ok"]
        code, out, _ = await ctl(tmp_path, "reset", "edu-a")
        assert (code, out) == (0, "device edu-a reset\n")


async def test_ctl_refusals_and_usage_exit_codes(tmp_path: Path) -> None:
    async with serving(CONFIG, tmp_path):
        missing = await ctl_json(tmp_path, "reset", "edu-c")
        assert missing["code"] == "NOT_FOUND" and "did you mean" in missing["error"]
        busy = await ctl_json(tmp_path, "hide", "edu-a")
        assert busy["code"] == "BUSY" and "unassign it before hiding" in busy["error"]
        stranger = await ctl_json(tmp_path, "assign", "edu-b", "gamma")
        assert stranger["code"] == "UNKNOWN_GUEST"
        assert (await ctl(tmp_path, "assign", "edu-b"))[0] == 2  # usage: GUEST missing
        assert (await ctl(tmp_path, "frobnicate"))[0] == 2
    code, _, err = await ctl(tmp_path, "status")
    assert code == 1 and "cannot reach the control socket" in err


# --------------------------------------------------------------------------- config


def test_one_owner_per_host_address_and_hide_patterns(tmp_path: Path) -> None:
    host = "[[device]]\nid='{}'\nkind='host'\naddress='0000:02:01.0'\n"
    with pytest.raises(ConfigFileError, match=r"^device\[1\]\.address: host device 0000:02:01.0"):
        parse_config(host.format("a") + host.format("b"))
    with pytest.raises(ConfigFileError, match=r"^device\[0\]\.guest: .* hidden by hide\[1\]"):
        parse_config(
            "hide = ['0000:05:*.*', '0000:02:*.*']\n[[guest]]\nname='g'\n"
            + host.format("a") + "guest='g'\n"
        )
    with pytest.raises(ConfigFileError, match=r"^hide\[0\]: '02:01.0' is not a host address"):
        parse_config("hide = ['02:01.0']")
    config = parse_config("hide = ['0000:03:*.*']")
    from shared.pci import PciAddress

    assert config.is_hidden(PciAddress.parse("0000:03:1f.7")) is not None
    assert config.is_hidden(PciAddress.parse("0000:04:00.0")) is None


def _snapshot_config(bus: str, hide: str = "") -> str:
    dump = REPO / "tests/data/pcidata/eth_intel_82576_sriov.txt"
    return (
        f"{hide}[[guest]]\nname='g'\nbus='{bus}'\n"
        "[[device]]\nid='e'\nmodel='edu'\nguest='g'\n"
        f"[[device]]\nid='nic'\nkind='snapshot'\ndump='{dump}'\nguest='g'\n"
    )


@pytest.mark.parametrize(("bus", "nic"), [("virtual", "00:01.0"), ("passthrough", "01:00.0")])
async def test_bus_views(tmp_path: Path, bus: str, nic: str) -> None:
    async with serving(_snapshot_config(bus), tmp_path, control=False) as (_backend, address):
        async with pcifront.connect(address, guest="g") as front:
            shown = sorted(str(d.address)[5:] for d in front.devices)
            assert shown == sorted(["00:00.0", nic])


async def test_hidden_snapshot_is_listed_but_offered_to_nobody(tmp_path: Path) -> None:
    text = _snapshot_config("virtual", hide="hide = ['0000:01:*.*']\n").replace(
        "guest='g'\n[[device]]\nid='nic'", "guest='g'\n[[device]]\nid='nic'"
    )
    text = text[: text.rindex("guest='g'")]  # the NIC is not assigned: it is hidden
    async with serving(text, tmp_path):
        rows = {r["id"]: r for r in (await ctl_json(tmp_path, "list"))["result"]}
        assert rows["nic"]["hidden"] and rows["nic"]["host"] == "0000:01:00.0"
        by_host = await ctl_json(tmp_path, "assign", "0000:01:00.0", "g")
        assert by_host["code"] == "ACCESS_DENIED"


# --------------------------------------------------------------------------- reset on release


async def _write_mark(front: pcifront.Bus, index: int = 0) -> None:
    dev = front.devices[index]
    await dev.bar_write(0, LIVENESS, 4, MARK)
    await dev.config_write(0x3C, 1, 0x5A)  # interrupt line: a register the guest may write
    assert await dev.bar_read(0, LIVENESS, 4) == MARK ^ 0xFFFFFFFF


async def _assert_clean(front: pcifront.Bus, index: int = 0) -> None:
    dev = front.devices[index]
    assert await dev.bar_read(0, LIVENESS, 4) == 0xFFFFFFFF
    assert await dev.config_read(0x3C, 1) != 0x5A


async def test_reset_on_unassign_before_the_next_owner(tmp_path: Path) -> None:
    async with serving(CONFIG, tmp_path) as (_backend, address):
        async with pcifront.connect(address, guest="alpha") as alpha:
            await _write_mark(alpha)
            assert (await ctl_json(tmp_path, "unassign", "edu-a"))["ok"]
        await trio.testing.wait_all_tasks_blocked()
        assert (await ctl_json(tmp_path, "assign", "edu-a", "beta"))["ok"]
        async with pcifront.connect(address, guest="beta") as beta:
            await _assert_clean(beta)


async def test_reset_on_disconnect(tmp_path: Path) -> None:
    async with serving(CONFIG, tmp_path, control=False) as (_backend, address):
        async with pcifront.connect(address, guest="alpha") as first:
            await _write_mark(first)
        await trio.testing.wait_all_tasks_blocked()  # the backend sees the goodbye
        async with pcifront.connect(address, guest="alpha") as second:
            await _assert_clean(second)


async def test_no_reset_while_another_connection_of_the_guest_remains(tmp_path: Path) -> None:
    async with serving(CONFIG, tmp_path, control=False) as (_backend, address):
        async with pcifront.connect(address, guest="alpha") as keeper:
            async with pcifront.connect(address, guest="alpha") as writer:
                await _write_mark(writer)
            assert await keeper.devices[0].bar_read(0, LIVENESS, 4) == MARK ^ 0xFFFFFFFF


async def test_reset_on_kill_9_of_the_frontend(tmp_path: Path) -> None:
    async with serving(CONFIG, tmp_path, kind="unix", control=False) as (backend, address):
        script = (
            "import sys, trio, pcifront\n"
            "async def go():\n"
            f"    async with pcifront.connect({address!r}, guest='alpha') as bus:\n"
            f"        await bus.devices[0].bar_write(0, {LIVENESS}, 4, {MARK})\n"
            "        print('written', flush=True)\n"
            "        await trio.sleep_forever()\n"
            "trio.run(go)\n"
        )
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO
        )
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(64)
            assert chunk, "the frontend exited before writing"
            line += chunk
        assert line == b"written\n"
        assert backend.registry.get("edu-a").provider.bar_read(0, LIVENESS, 4) == MARK ^ 0xFFFFFFFF
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        await proc.stdout.aclose()
        await trio.testing.wait_all_tasks_blocked()  # the backend notices the dead peer
        assert not backend.sessions_of("alpha")
        async with pcifront.connect(address, guest="alpha") as bus:
            await _assert_clean(bus)


async def test_reset_on_reload_move(tmp_path: Path) -> None:
    path = tmp_path / "backend.toml"
    listen = f"listen = [{json.dumps(listen_address('memory', tmp_path))}]\n"
    path.write_text(listen + CONFIG)
    async with serving(CONFIG, tmp_path, control=False) as (backend, address):
        backend.config = parse_config(path.read_text(), base=tmp_path)
        async with pcifront.connect(address, guest="alpha") as alpha:
            await _write_mark(alpha)
        async with pcifront.connect(address, guest="alpha") as alpha:
            await _write_mark(alpha)  # connected while the reload moves its device away
            path.write_text(listen + CONFIG.replace('guest = "alpha"', 'guest = "beta"'))
            result = await reload(backend, path)
            assert result.moves == (("edu-a", "alpha", "beta"),)
            assert alpha.devices == []
        async with pcifront.connect(address, guest="beta") as beta:
            await _assert_clean(beta)


async def test_writable_host_device_gets_its_saved_config_back(
    tmp_path: Path, fake_host: FakeHost
) -> None:
    """Never this machine's devices: a fake sysfs tree in tmp_path."""
    original = fake_host.add("0000:05:00.0", 0x8086, 0x10C9, 0x020000)  # an Intel 82576 NIC
    text = listen_line(listen_address("memory", tmp_path)) + writable_host_config(
        fake_host.root, "0000:05:00.0"
    )
    config_file = fake_host.config("0000:05:00.0")
    backend = Backend(parse_config(text, base=tmp_path))
    stop = trio.CancelScope()

    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            with stop:
                await backend.serve(task_status=task_status)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        address = (await nursery.start(run))[0]
        async with pcifront.connect(address, guest="g") as front:
            await front.devices[0].config_write(0x40, 4, 0xCAFEF00D)
            assert config_file.read_bytes()[0x40:0x44] == bytes.fromhex("0df0feca")
        await trio.testing.wait_all_tasks_blocked()
        assert not backend.sessions_of("g")
        # The guest left: the release put the saved config back before anyone else came.
        assert config_file.read_bytes() == original
        async with pcifront.connect(address, guest="g") as front:
            await front.devices[0].config_write(0x44, 2, 0xBEEF)
            assert config_file.read_bytes() != original
            stop.cancel()  # the backend stops while the guest is still connected
            await stopped.wait()
            assert config_file.read_bytes() == original


@pytest.mark.parametrize("hide", ["'msi'", "0x05"])
async def test_hidden_capability_really_disappears(tmp_path: Path, hide: str) -> None:
    text = "[[guest]]\nname='g'\n[[device]]\nid='e'\nmodel='edu'\nguest='g'\n"
    async with serving(text + f"hide_capabilities=[{hide}]\n", tmp_path, control=False) as (
        _backend,
        address,
    ):
        async with pcifront.connect(address, guest="g") as front:
            dev = front.devices[0]
            assert await dev.config_read(0x34, 1) == 0  # no capability list at all
            assert not await dev.config_read(0x06, 2) & 0x10  # Status.CAP_LIST clear
    with pytest.raises(ConfigFileError, match=r"hide_capabilities\[0\]: 4096 is not"):
        parse_config(text + "hide_capabilities=[0x1000]\n")


def test_ctl_reads_a_refusal_sent_before_its_request_went_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that refuses a peer answers and closes at once, maybe before the request
    is sent: the request then fails with EPIPE, and the refusal must still be read."""
    from pciback.ops import control_client

    path = tmp_path / "pciback.ctl"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    refusal = {"ok": False, "error": "not authorized", "code": "NOT_AUTHORIZED"}
    closed = threading.Event()

    def refuse() -> None:
        conn, _ = listener.accept()
        with conn:  # send, not sendall: accept() made it a LateSender too
            conn.send(json.dumps(refusal).encode() + b"\n")
        closed.set()

    class LateSender(socket.socket):
        """A real socket whose request goes out only after the backend has closed."""

        def sendall(self, data: bytes, flags: int = 0) -> None:  # type: ignore[override]
            assert closed.wait(10)
            super().sendall(data, flags)

    server = threading.Thread(target=refuse)
    server.start()
    monkeypatch.setattr(control_client.socket, "socket", LateSender)
    try:
        assert control_client.request(path, {"command": "status"}, timeout=10) == refusal
    finally:
        server.join(10)
        listener.close()
