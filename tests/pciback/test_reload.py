"""SIGHUP's reload applies device-definition changes as hot-plug; other guests notice nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

import pcifront
from pciback.config import parse_config
from pciback.devices import HostDevice
from pciback.ops.lifecycle import reload
from pciback.plane.registry import NotAssignedError
from pciback.service import Backend
from pciback.testing import FakeHost, listen_address
from shared.errors import ConfigFileError
from tests.support.configs import device_table, edu_config, writable_host_config

LIVENESS = 0x04  # edu BAR0: reads back the complement of what was written (~0 at reset)
MARK = 0x12345678
EDU_ID = 0x11E81234
TIMEOUT = 20.0  # a stall guard (a hot-plug step that never completes), not a speed target

BEFORE = edu_config(["alpha", "beta"], {"edu-a": "alpha", "edu-b": "beta", "edu-c": None})
#: edu-a as it was; edu-b redefined (MSI hidden); edu-c removed; edu-d added for beta.
AFTER = (
    edu_config(["alpha", "beta"], {"edu-a": "alpha"})
    + device_table("edu-b", "beta", hide_capabilities=["msi"])
    + device_table("edu-d", "beta")
)


_LISTEN: dict[Path, str] = {}


def _listen(tmp: Path) -> str:
    """One memory: address per test (a reload that changed it would be refused)."""
    if tmp not in _LISTEN:
        _LISTEN[tmp] = f"listen = [{json.dumps(listen_address('memory', tmp))}]\n"
    return _LISTEN[tmp]


async def test_device_definition_changes_apply_as_hotplug_and_spare_other_guests(
    tmp_path: Path,
) -> None:
    path = tmp_path / "backend.toml"
    path.write_text(_listen(tmp_path) + BEFORE)
    backend = Backend(parse_config(path.read_text(), base=tmp_path))
    with trio.fail_after(TIMEOUT):
        await _redefine(backend, path, tmp_path)


async def _redefine(backend: Backend, path: Path, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        address = (await nursery.start(backend.serve))[0]
        async with pcifront.connect(address, guest="alpha") as alpha, pcifront.connect(
            address, guest="beta"
        ) as beta:
            (kept,) = alpha.devices
            alpha_session = backend.sessions_of("alpha")[0]
            await kept.bar_write(0, LIVENESS, 4, MARK)
            await beta.devices[0].bar_write(0, LIVENESS, 4, MARK)
            assert await beta.devices[0].config_read(0x34, 1) != 0  # edu lists MSI
            beta_changes = beta.changes()

            # A request of alpha's is pending (its device is busy) across the whole reload.
            lock = backend.registry.get("edu-a").lock
            await lock.acquire()
            pending: list[int] = []

            async def read() -> None:
                pending.append(await kept.bar_read(0, LIVENESS, 4))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            path.write_text(_listen(tmp_path) + AFTER)
            try:
                result = await reload(backend, path)
                assert pending == []
            finally:
                lock.release()
            assert (result.moves, result.redefined, result.added, result.removed) == (
                (), ("edu-b",), ("edu-d",), ("edu-c",)
            )
            assert result.describe() == "edu-b: redefined; edu-d: added; edu-c: removed"
            await trio.testing.wait_all_tasks_blocked()
            assert pending == [MARK ^ 0xFFFFFFFF]  # completed, and edu-a kept its state

            # alpha noticed nothing: same session, same device, no hot-plug event.
            assert backend.sessions_of("alpha") == [alpha_session] and alpha.connected
            assert alpha.devices == [kept] and alpha.statistics().hotplug_events == 0

            # beta saw edu-b leave (reset) and come back redefined, and edu-d arrive.
            seen = [
                (c.kind, c.address) for c in [await beta_changes.__anext__() for _ in range(3)]
            ]
            assert seen == [
                (pcifront.ChangeKind.REMOVED, "0000:00:00.0"),
                (pcifront.ChangeKind.ADDED, "0000:00:00.0"),
                (pcifront.ChangeKind.ADDED, "0000:00:01.0"),
            ]
            redefined, added = beta.devices
            assert await redefined.config_read(0x34, 1) == 0  # MSI hidden: no capability list
            assert await redefined.bar_read(0, LIVENESS, 4) == 0xFFFFFFFF  # not beta's mark
            assert await added.config_read(0, 4) == EDU_ID
        with pytest.raises(NotAssignedError):
            backend.registry.get("edu-c")
        assert backend.registry.get("edu-d").runtime is not None
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("[limits]\nmax_connections_per_guest = 3\n", "limits"),
        ("[transport]\nshm_poll_us = 10\n", "transport"),
        ("[dma]\ncall_timeout = 1.0\n", "dma"),
    ],
)
async def test_changes_only_a_restart_can_make_are_refused_and_nothing_changes(
    tmp_path: Path, change: str, key: str
) -> None:
    path = tmp_path / "backend.toml"
    path.write_text(_listen(tmp_path) + BEFORE)
    backend = Backend(parse_config(path.read_text(), base=tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        running = backend.config
        path.write_text(_listen(tmp_path) + change + AFTER)
        with pytest.raises(ConfigFileError, match=rf"^{key}: changed, which needs a restart"):
            await reload(backend, path)
        assert backend.config is running
        assert backend.registry.get("edu-c").config.id == "edu-c"
        nursery.cancel_scope.cancel()


async def test_a_new_device_that_cannot_be_created_refuses_the_reload(tmp_path: Path) -> None:
    path = tmp_path / "backend.toml"
    path.write_text(_listen(tmp_path) + BEFORE)
    backend = Backend(parse_config(path.read_text(), base=tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.serve)
        (tmp_path / "nic.txt").write_text("00:01.0 not a dump\n")
        path.write_text(
            _listen(tmp_path) + BEFORE + "[[device]]\nid='nic'\nkind='snapshot'\ndump='nic.txt'\n"
        )
        with pytest.raises(ConfigFileError, match=r"nic"):
            await reload(backend, path)
        assert [d.id for d in backend.registry] == ["edu-a", "edu-b", "edu-c"]
        nursery.cancel_scope.cancel()


async def test_a_redefined_writable_host_device_keeps_its_clean_saved_config(
    tmp_path: Path, fake_host: FakeHost
) -> None:
    """Never this machine's devices: a fake sysfs tree in tmp_path."""
    original = fake_host.add("0000:05:00.0", 0x8086, 0x10C9, 0x020000)  # an Intel 82576 NIC
    path = tmp_path / "backend.toml"
    path.write_text(_listen(tmp_path) + writable_host_config(fake_host.root, "0000:05:00.0"))
    backend = Backend(parse_config(path.read_text(), base=tmp_path), control=tmp_path / "b.ctl")
    config_file = fake_host.config("0000:05:00.0")
    async with trio.open_nursery() as nursery:
        address = (await nursery.start(backend.serve))[0]
        async with pcifront.connect(address, guest="g") as front:
            await front.devices[0].config_write(0x40, 4, 0xCAFEF00D)
            # Redefined while the guest holds it (and has written to it).
            path.write_text(
                _listen(tmp_path)
                + writable_host_config(fake_host.root, "0000:05:00.0", policy="default")
            )
            assert (await reload(backend, path)).redefined == ("h",)
            assert config_file.read_bytes() == original  # reset on its way out
            provider = backend.registry.get("h").provider
            assert isinstance(provider, HostDevice) and provider.saved_config == original
            assert await front.devices[0].config_read(0x40, 4) == 0
        nursery.cancel_scope.cancel()
    assert config_file.read_bytes() == original
