"""The pure parts of the test-VM tooling (vm/): initramfs archives, module dependencies, the
apt mirror, QEMU's command line, the image's atomic parts, and waiting for a server's socket.

What a real guest makes of it (the kernel unpacking our archives, modprobe, QEMU) is proved by
the boots in ``test_vm_gpio.py``.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vm import image, initramfs
from vm.errors import VmError, VmImageError
from vm.guest import device_json, qemu_argv
from vm.servers import wait_for_socket


def _read_newc(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """An independent reader of the newc format (as the kernel's init/initramfs.c reads it)."""
    members: list[tuple[str, int, bytes, tuple[int, int]]] = []
    at = 0
    while True:
        assert archive[at:at + 6] == b"070701", f"bad magic at {at}"
        fields = [int(archive[at + 6 + 8 * i: at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = archive[at + 110: at + 110 + namesize - 1].decode()
        assert archive[at + 110 + namesize - 1] == 0
        at = (at + 110 + namesize + 3) & ~3
        data = archive[at: at + size]
        at = (at + size + 3) & ~3
        if name == "TRAILER!!!":
            assert at == len(archive)
            return members
        members.append((name, mode, data, (rmaj, rmin)))


def test_cpio_writes_every_kind_of_member_aligned_and_reproducibly() -> None:
    entries = [initramfs.directory("bin"), initramfs.file("bin/x", b"12345", 0o755),
               initramfs.chardev("dev/console", 5, 1), initramfs.symlink("sh", "bin/x"),
               initramfs.file("empty", b"")]
    archive = initramfs.cpio(entries)
    assert archive == initramfs.cpio(entries)
    assert len(archive) % 4 == 0
    members = _read_newc(archive)
    assert [(name, stat.S_IFMT(mode), data) for name, mode, data, _ in members] == [
        ("bin", stat.S_IFDIR, b""), ("bin/x", stat.S_IFREG, b"12345"),
        ("dev/console", stat.S_IFCHR, b""), ("sh", stat.S_IFLNK, b"bin/x"),
        ("empty", stat.S_IFREG, b"")]
    assert stat.S_IMODE(members[1][1]) == 0o755
    assert members[2][3] == (5, 1)


@pytest.mark.parametrize("path", ["", "/init", "a/../b", ".."])
def test_cpio_entries_must_be_relative_paths(path: str) -> None:
    with pytest.raises(VmImageError, match="relative"):
        initramfs.file(path, b"")


def _module(tmp_path: Path, modinfo: bytes) -> bytes:
    """A relocatable ELF object with a .modinfo section, as the kernel build makes for a .ko."""
    body = ", ".join(str(b) for b in modinfo)
    source = tmp_path / "mod.c"
    source.write_text('__attribute__((section(".modinfo"), used)) '
                      f"static const unsigned char info[] = {{{body}}};\n")
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "mod.o"), str(source)], check=True)
    return (tmp_path / "mod.o").read_bytes()


def test_module_depends_reads_the_modinfo_section(tmp_path: Path) -> None:
    ko = _module(tmp_path, b"license=GPL\0depends=uio,irq-bypass\0name=thing\0")
    assert initramfs.module_depends(ko) == ["uio", "irq-bypass"]
    assert initramfs.module_depends(_module(tmp_path, b"depends=\0name=x\0")) == []


def test_module_depends_refuses_what_is_not_a_module(tmp_path: Path) -> None:
    with pytest.raises(VmImageError, match="not a 64-bit little-endian ELF"):
        initramfs.module_depends(b"#!/bin/sh\n" * 10, "uio")
    truncated = _module(tmp_path, b"depends=\0")[:200]
    with pytest.raises(VmImageError, match="outside the file"):
        initramfs.module_depends(truncated, "uio")


def test_module_closure_orders_dependencies_first(tmp_path: Path) -> None:
    mods = {"a": _module(tmp_path, b"depends=b,c-d\0"), "b": _module(tmp_path, b"depends=c_d\0"),
            "c_d": _module(tmp_path, b"depends=\0"), "e": _module(tmp_path, b"depends=\0")}
    read = mods.__getitem__
    available = {name: name for name in mods}
    assert initramfs.module_closure(["a", "e"], available, read) == ["c_d", "b", "a", "e"]
    with pytest.raises(VmImageError, match=r"kernel module nope \(needed by the module list\)"):
        initramfs.module_closure(["nope"], available, read)
    loop = {"x": _module(tmp_path, b"depends=y\0"), "y": _module(tmp_path, b"depends=x\0")}
    with pytest.raises(VmImageError, match="depends on itself"):
        initramfs.module_closure(["x"], {n: n for n in loop}, loop.__getitem__)


def _apt(tmp_path: Path, files: dict[str, str]) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


def test_find_mirror_reads_deb822_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCISPLIT_VM_MIRROR", raising=False)
    etc = _apt(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "# a comment\nTypes: deb-src deb\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"),
        "sources.list.d/other.sources": "Types: deb\nURIs: https://other.example/apt\n"
                                         "Suites: nodistro\nComponents: main\n"})
    assert image.find_mirror(etc) == ("http://mirror.example/debian",
                                      "/usr/share/keyrings/debian-archive-keyring.gpg")


def test_find_mirror_reads_one_line_sources(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCISPLIT_VM_MIRROR", raising=False)
    etc = _apt(tmp_path, {"sources.list": (
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n")})
    assert image.find_mirror(etc) == ("http://mirror.example/debian", "/k.gpg")
    monkeypatch.setenv("PCISPLIT_VM_MIRROR", "http://override.example/debian")
    assert image.find_mirror(etc) == ("http://override.example/debian", "")


def test_find_mirror_says_what_to_do_without_a_debian_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCISPLIT_VM_MIRROR", raising=False)
    etc = _apt(tmp_path, {"sources.list": "deb https://other.example/apt nodistro main\n"})
    with pytest.raises(VmImageError, match="PCISPLIT_VM_MIRROR"):
        image.find_mirror(etc)


def test_qemu_version_must_have_vfio_user_pci() -> None:
    assert image.qemu_version_ok("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-2)") == (11, 1)
    assert image.qemu_version_ok("QEMU emulator version 10.1.0") == (10, 1)
    assert image.qemu_version_ok("QEMU emulator version 10.0.2 (Debian)") is None
    assert image.qemu_version_ok("something else") is None


def test_qemu_argv_gives_the_guest_only_its_vfio_user_devices() -> None:
    argv = qemu_argv("/k", "/i", sockets=["/run/a.sock", "/run/b,c.sock"],
                     serial=["file:/w/console"], append="quiet")
    assert "-nodefaults" in argv and "-no-user-config" in argv and "-no-reboot" in argv
    devices = [json.loads(argv[i + 1]) for i, word in enumerate(argv) if word == "-device"]
    assert devices == [{"driver": "vfio-user-pci", "socket": {"type": "unix", "path": p}}
                       for p in ("/run/a.sock", "/run/b,c.sock")]
    assert "memory-backend-memfd,id=ram0,size=256M,share=on" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=-1 quiet"
    assert json.loads(device_json("/s", addr="05.0"))["addr"] == "05.0"


def test_chroot_binds_only_under_run_or_tmp(tmp_path: Path) -> None:
    with pytest.raises(VmImageError, match="under /run/ or /tmp/"):
        image.chroot_argv(tmp_path, ["true"], [(tmp_path, "/etc/x")])


def test_a_missing_image_names_the_make_target(tmp_path: Path) -> None:
    with pytest.raises(VmImageError, match="make vm-image"):
        image.Image(tmp_path / "nothing").require()


def test_a_part_is_replaced_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "root"
    final.mkdir()
    (final / "stamp.json").write_text("{}")
    with pytest.raises(RuntimeError), image._scratch(final) as scratch:
        (scratch / "half").write_text("x")
        raise RuntimeError("a step failed")
    assert [p.name for p in tmp_path.iterdir()] == ["root"]
    assert [p.name for p in final.iterdir()] == ["stamp.json"]
    with image._scratch(final) as scratch:
        (scratch / "whole").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["root"]
    assert [p.name for p in final.iterdir()] == ["whole"]


SERVER = """
import socket, sys
sys.stdin.readline()
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
sys.stdin.readline()
"""


def test_wait_for_socket_returns_when_the_server_listens(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(path)], stdin=subprocess.PIPE)
    assert server.stdin is not None
    try:
        server.stdin.write(b"go\n")
        server.stdin.flush()
        wait_for_socket(path, server, timeout=60)
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        server.kill()
        server.wait()


def test_wait_for_socket_fails_when_the_server_exits_first(tmp_path: Path) -> None:
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(VmError, match=r"exited \(status 3\) before listening"):
        wait_for_socket(tmp_path / "never.sock", server, timeout=60)
