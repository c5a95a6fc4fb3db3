"""Reset on release (XSA-306) where the backend itself goes away, checked by content.

* ``SIGTERM``: the real ``pciback serve`` process stops while a guest holds a
  writable host device (a fake sysfs tree under tmp_path, never this
  machine's devices) and a snapshot device, both written to. The host
  device's file holds its original bytes again; the snapshot's dump file was
  never written, and the next backend serves the dump's bytes.
* ``SIGKILL`` of the backend restores nothing; the state file beside the
  control socket lets the next start restore the writable host device before
  any guest connects (``pciback.plane.hoststate``).
* One device whose reset fails (a model raising anything) never skips the
  reset of the others, on shutdown, disconnect and unassign; it is counted,
  logged, and (on unassign) hidden.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

import pcifront
from pciback.config import parse_config
from pciback.devices import EduDevice, HostDevice
from pciback.plane.hoststate import HostStateFile, state_path_for
from pciback.plane.registry import MODELS
from pciback.service import Backend
from pciback.testing import FakeHost, listen_address
from shared.errors import ConfigFileError
from tests.support.configs import device_table, listen_line, writable_host_config
from tests.support.serve import TIMEOUT, ServeProcess

REPO = Path(__file__).resolve().parents[2]
DUMP = REPO / "tests/data/pcidata/eth_intel_82576_sriov.txt"
HOST = "0000:05:00.0"
SNAPSHOT_FREE = 0xF0  # the 82576 dump: past its last capability, plain read/write memory



def _serve(tmp: Path, fake_host: FakeHost) -> ServeProcess:
    """``pciback serve -v`` (the backend.log that tests read has its info lines) serving guest g
    a writable host device h (at HOST in ``fake_host``) and a snapshot nic of DUMP."""
    config = (
        listen_line(f"unix:{tmp / 'pciback.sock'}")
        + writable_host_config(fake_host.root, HOST)
        + device_table("nic", "g", model=None, kind="snapshot", dump=str(DUMP), policy="permissive")
    )
    return ServeProcess(tmp, "-v", config=config)


async def _write_both(front: pcifront.Bus) -> None:
    host, nic = front.devices  # bus order: h at 00:00.0, nic at 00:01.0
    await host.config_write(0x40, 4, 0xCAFEF00D)
    await nic.config_write(SNAPSHOT_FREE, 4, 0x5A5A5A5A)
    assert await nic.config_read(SNAPSHOT_FREE, 4) == 0x5A5A5A5A


@pytest.mark.slow
async def test_sigterm_resets_a_held_host_device_and_snapshot_by_content(
    tmp_path: Path, fake_host: FakeHost
) -> None:
    original = fake_host.add(HOST, 0x8086, 0x10C9, 0x020000)  # an Intel 82576 NIC
    config_file = fake_host.config(HOST)
    dump_before = DUMP.read_bytes()
    async with _serve(tmp_path, fake_host) as server:
        async with pcifront.connect(server.address("unix"), guest="g") as front:
            await _write_both(front)
            assert config_file.read_bytes()[0x40:0x44] == bytes.fromhex("0df0feca")
            # While a guest holds it, the saved config is on disk beside the control socket.
            assert state_path_for(tmp_path / "pciback.ctl").exists()
            server.send_signal(signal.SIGTERM)
            assert await server.await_exit() == 0
            # The guest was told before the backend went.
            with trio.fail_after(TIMEOUT):
                lost = await front.wait_closed()
            assert "shutting down (SIGTERM)" in lost
        assert config_file.read_bytes() == original
        # A clean stop with the device restored: nothing left to restore next time.
        assert not state_path_for(tmp_path / "pciback.ctl").exists()
        # A snapshot's original image is its dump file, which no guest write ever reaches:
        # the next backend (the same process would reset it, too) serves the dump's bytes.
        assert DUMP.read_bytes() == dump_before
    async with _serve(tmp_path, fake_host) as server:
        async with pcifront.connect(server.address("unix"), guest="g") as front:
            host, nic = front.devices
            assert await nic.config_read(SNAPSHOT_FREE, 4) == 0
            assert await host.config_read(0x40, 4) == 0
        assert await server.astop() == 0


@pytest.mark.slow
async def test_sigkill_of_the_backend_is_repaired_by_the_next_start(
    tmp_path: Path, fake_host: FakeHost
) -> None:
    original = fake_host.add(HOST, 0x8086, 0x10C9, 0x020000)  # an Intel 82576 NIC
    config_file = fake_host.config(HOST)
    state = state_path_for(tmp_path / "pciback.ctl")
    async with _serve(tmp_path, fake_host) as server:
        async with pcifront.connect(server.address("unix"), guest="g") as front:
            await _write_both(front)
            server.send_signal(signal.SIGKILL)
            assert await server.await_exit() == -signal.SIGKILL
        # Nobody reset anything: the guest's write is still in the device...
        dirty = config_file.read_bytes()
        assert dirty[0x40:0x44] == bytes.fromhex("0df0feca")
        # ...and the state file says what it must go back to.
        assert HostStateFile(state).load() == {HOST: original}
    async with _serve(tmp_path, fake_host) as server:
        # Restored at start, before any guest could connect.
        assert config_file.read_bytes() == original
        assert "the last backend did not stop cleanly; restored the config" in server.log_text()
        async with pcifront.connect(server.address("unix"), guest="g") as front:
            assert await front.devices[0].config_read(0x40, 4) == 0
            await front.devices[0].config_write(0x44, 4, 0x0BADF00D)
        await trio.testing.wait_all_tasks_blocked()
        # The saved config kept is the clean one, not what was read at open time.
        assert HostStateFile(state).load() == {HOST: original}
        assert await server.astop() == 0
        assert config_file.read_bytes() == original
        assert not state.exists()


def _state(state: HostStateFile, configs: dict[str, str]) -> None:
    devices = {address: {"config": text} for address, text in configs.items()}
    state.path.write_text(json.dumps({"version": 1, "devices": devices}))


def test_a_state_file_that_does_not_fit_the_device_stops_the_start(
    tmp_path: Path, fake_host: FakeHost
) -> None:
    original = fake_host.add(HOST, 0x8086, 0x10C9, 0x020000)  # an Intel 82576 NIC
    config = fake_host.config(HOST)
    state = HostStateFile(tmp_path / "pciback.ctl.state")
    with HostDevice(HOST, writable=True, sysfs_root=fake_host.root) as dev:
        other = b"\x86\x80\xd3\x10" + original[4:]  # another device's IDs at that address
        _state(state, {HOST: other.hex()})
        config.write_bytes(original[:0x40] + b"\xff" * 4 + original[0x44:])
        with pytest.raises(ConfigFileError, match=r"does not fit the device now at that address"):
            state.adopt([dev])
        assert config.read_bytes()[0x40:0x44] == b"\xff" * 4  # nothing was written
        state.path.write_text("{not json")
        with pytest.raises(ConfigFileError, match=r"not a pciback host device state file"):
            state.adopt([dev])
        # A recorded device no longer served writable: not restored, said so, file dropped.
        _state(state, {"0000:06:00.0": "00"})
        assert state.adopt([]) == []
        assert not state.path.exists()


# --------------------------------------------------------------------------- failing resets


class BrokenResetEdu(EduDevice):
    """An edu whose reset fails once ``broken`` is set (a plugin model with a bug)."""

    broken = False

    def reset(self) -> None:
        if self.broken:
            raise RuntimeError("the model's reset failed (a test's broken plugin)")
        super().reset()


MODELS.setdefault("broken-reset-edu", BrokenResetEdu)

TWO = """
[[guest]]
name = "alpha"
[[guest]]
name = "beta"
[[device]]
id = "bad"
model = "broken-reset-edu"
guest = "alpha"
[[device]]
id = "good"
model = "edu"
guest = "alpha"
"""
LIVENESS = 0x04
MARK = 0x12345678


async def test_a_failing_reset_never_skips_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config(f"listen = [{json.dumps(listen_address('memory', tmp_path))}]\n" + TWO)
    backend = Backend(config)
    bad, good = backend.registry.get("bad"), backend.registry.get("good")
    caplog.set_level(logging.INFO, "pcisplit.backend")
    async with trio.open_nursery() as nursery:
        address = (await nursery.start(backend.serve))[0]
        bad.provider.broken = True  # type: ignore[attr-defined]

        async def mark() -> None:
            async with pcifront.connect(address, guest="alpha") as front:
                for dev in front.devices:
                    await dev.bar_write(0, LIVENESS, 4, MARK)

        # Disconnect: the good device is reset although the bad one (first on the bus) failed.
        await mark()
        await trio.testing.wait_all_tasks_blocked()
        assert good.provider.bar_read(0, LIVENESS, 4) == 0xFFFFFFFF
        assert backend.reset_failures == 1
        assert "device bad: reset (guest alpha disconnected) failed" in caplog.text
        assert "the model's reset failed" in caplog.text  # with its traceback

        # Unassign: the device whose reset failed is offered to nobody.
        result = await backend.unassign("bad")
        assert result.change == "removed"
        assert backend.reset_failures == 2 and bad.state == "hidden"
        with pytest.raises(Exception, match="hidden"):
            await backend.assign("bad", "beta")
        assert "could not be reset, so it is hidden" in caplog.text

        # Shutdown: both assigned devices are reset; the failure of one is counted.
        backend.registry.set_hidden("bad", False)
        await backend.assign("bad", "alpha")
        failures = backend.reset_failures
        async with pcifront.connect(address, guest="alpha") as front:
            for dev in front.devices:
                await dev.bar_write(0, LIVENESS, 4, MARK)
            assert good.provider.bar_read(0, LIVENESS, 4) == MARK ^ 0xFFFFFFFF
            nursery.cancel_scope.cancel()
    assert good.provider.bar_read(0, LIVENESS, 4) == 0xFFFFFFFF
    assert backend.reset_failures == failures + 1
    assert "device bad: reset (the backend stopped) failed" in caplog.text
