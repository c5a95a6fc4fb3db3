"""The guest's initramfs, written by us: a newc cpio archive and kernel-module dependencies.

Pure functions on bytes (no subprocesses, no network): :func:`cpio` writes an archive the
kernel unpacks at boot, :func:`module_depends` reads a module's ``depends=`` list out of its
``.modinfo`` ELF section, and :func:`module_closure` orders a set of modules with everything
they need before them. ``vm.image`` uses them to build ``.vm/boot/initramfs.gz``;
``vm.guest`` uses :func:`cpio` for the small archive it appends with each boot's script.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from vm.errors import VmImageError

__all__ = ["Entry", "cpio", "directory", "file", "chardev", "symlink",
           "module_depends", "module_closure"]

#: The magic of the "new ASCII" (SVR4, no checksum) cpio format, the one the kernel reads.
NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True, slots=True)
class Entry:
    """One archive member: ``path`` (relative, no leading slash), its mode and content."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not self.path or self.path.startswith("/") or ".." in self.path.split("/"):
            raise VmImageError(f"initramfs entry path {self.path!r} must be relative, "
                               "without '..' (for example 'bin/busybox')")
        if stat.S_IFMT(self.mode) == 0:
            raise VmImageError(f"initramfs entry {self.path!r} has no file type in its mode "
                               f"{self.mode:o} (use stat.S_IFREG, S_IFDIR, ...)")


def directory(path: str, perm: int = 0o755) -> Entry:
    """A directory entry."""
    return Entry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
    """A regular file entry holding ``data``."""
    return Entry(path, stat.S_IFREG | perm, data)


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    """A character device node (the archive carries it; no privilege is needed to write it)."""
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def symlink(path: str, target: str) -> Entry:
    """A symbolic link to ``target``."""
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio(entries: Iterable[Entry]) -> bytes:
    """The newc archive of ``entries`` in order, with the trailer; byte-for-byte reproducible.

    Owner root, mtime 0, inode numbers counted from 1. A parent directory must come before
    what it holds (the kernel creates members in archive order).
    """
    out = bytearray()
    for ino, entry in enumerate([*entries, Entry(TRAILER, stat.S_IFREG)], start=1):
        name = entry.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (ino if entry.path != TRAILER else 0, entry.mode, 0, 0,
                  nlink if entry.path != TRAILER else 1, 0, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


# ELF64, little endian: the only kind of kernel module this builds for (x86-64).
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")


def _sections(elf: bytes, what: str) -> dict[str, bytes]:
    if len(elf) < _EHDR.size or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise VmImageError(f"{what} is not a 64-bit little-endian ELF file")
    (_ident, _type, _machine, _version, _entry, _phoff, shoff, _flags, _ehsize, _phentsize,
     _phnum, shentsize, shnum, shstrndx) = _EHDR.unpack_from(elf)
    if shentsize != _SHDR.size or shoff + shnum * shentsize > len(elf) or shstrndx >= shnum:
        raise VmImageError(f"{what}: its ELF section table lies outside the file")
    headers = [_SHDR.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
    names_at, names_size = headers[shstrndx][4], headers[shstrndx][5]
    names = elf[names_at:names_at + names_size]
    sections = {}
    for name_off, sh_type, _f, _addr, offset, size, *_rest in headers:
        end = names.find(b"\0", name_off)
        name = names[name_off:end].decode("ascii", "replace")
        if sh_type != 8:  # SHT_NOBITS has no bytes in the file
            if offset + size > len(elf):
                raise VmImageError(f"{what}: section {name} lies outside the file")
            sections[name] = elf[offset:offset + size]
    return sections


def module_depends(ko: bytes, what: str = "module") -> list[str]:
    """The module names ``ko`` (an uncompressed ``.ko``) needs loaded first, from ``depends=``."""
    modinfo = _sections(ko, what).get(".modinfo")
    if modinfo is None:
        raise VmImageError(f"{what} has no .modinfo section: is it a kernel module?")
    for field in modinfo.split(b"\0"):
        if field.startswith(b"depends="):
            value = field[len(b"depends="):].decode("ascii", "replace")
            return [name for name in value.split(",") if name]
    return []


def _canonical(name: str) -> str:
    return name.replace("-", "_")


def module_closure(wanted: Iterable[str], available: Mapping[str, str],
                   read: Callable[[str], bytes]) -> list[str]:
    """``wanted`` module names and everything they depend on, dependencies first.

    ``available`` maps a module name (``-`` and ``_`` are the same) to where it lies;
    ``read(where)`` returns the uncompressed module. Unknown names raise
    :class:`VmImageError` naming the module that asked for them.
    """
    known = {_canonical(name): where for name, where in available.items()}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, asked_by: str) -> None:
        name = _canonical(name)
        if name in order:
            return
        if name in visiting:
            raise VmImageError(f"kernel module {name} depends on itself (through {asked_by})")
        where = known.get(name)
        if where is None:
            raise VmImageError(f"kernel module {name} (needed by {asked_by}) is not in the "
                               "kernel package: check the module name")
        visiting.add(name)
        for dep in module_depends(read(where), f"kernel module {name}"):
            visit(dep, name)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name, "the module list")
    return order
