"""Build the test VM under ``.vm/`` from Debian's packages only (``make vm-image``).

Two parts, each built in a scratch directory beside its final place and renamed into place
only when complete, with a ``stamp.json`` naming what went in (a directory without a stamp,
or with a stamp of another recipe, is never used: it is rebuilt):

``.vm/root/``
    A minimal Debian root (``debootstrap --variant=minbase``) of :data:`SUITE`, with
    ``qemu-system-x86`` from :data:`BACKPORTS` (QEMU >= 10.1 has ``vfio-user-pci``) and
    pciutils. QEMU runs from it through ``chroot`` in a private mount namespace
    (:func:`chroot_argv`), so the host keeps its own Debian.
``.vm/boot/``
    ``vmlinuz`` from the suite's ``linux-image-amd64`` and ``initramfs.gz``: busybox-static,
    pciutils' ``lspci``/``setpci`` with their libraries, the kernel modules of
    :data:`MODULES` (and what they depend on) for ``modprobe``, and ``vm/init.sh`` as
    ``/init``.

The mirror is the one the machine's own apt configuration uses for Debian
(``/etc/apt/sources.list`` and ``sources.list.d``); ``PCISPLIT_VM_MIRROR`` overrides it.
Building needs root (debootstrap, chroot, mount namespaces). A second run with both stamps
current does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vm import initramfs
from vm.errors import VmImageError

__all__ = ["SUITE", "BACKPORTS", "MODULES", "QEMU_MIN", "Image", "cache_dir", "build",
           "find_mirror", "chroot_argv", "qemu_version_ok"]

#: The Debian suite of the VM's root and kernel, and the suite QEMU comes from.
SUITE = "trixie"
BACKPORTS = "trixie-backports"
#: The oldest QEMU with the ``vfio-user-pci`` device.
QEMU_MIN = (10, 1)
#: Packages installed in the root (no recommends); QEMU comes from :data:`BACKPORTS`.
ROOT_PACKAGES = ("qemu-system-x86", "pciutils", "pci.ids")
#: Kernel modules the initramfs carries (with their dependencies) for the guest's modprobe.
MODULES = ("uio", "uio_pci_generic")
#: Bump when the way a part is built changes (the stamps then no longer match).
ROOT_RECIPE = 1
BOOT_RECIPE = 1

HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """Where the image lives: ``PCISPLIT_VM_DIR``, else ``.vm`` in the checkout."""
    configured = os.environ.get("PCISPLIT_VM_DIR")
    return Path(configured).resolve() if configured else HERE.parent / ".vm"


def _log(message: str) -> None:
    print(f"vm-image: {message}", file=sys.stderr, flush=True)


# --- the machine's apt configuration ---------------------------------------------------------

def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, ""
        elif line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()
    if stanza:
        yield stanza


def _apt_sources(etc_apt: Path) -> list[tuple[str, list[str], list[str], str]]:
    """(uri, suites, components, signed_by) of every enabled ``deb`` source."""
    found = []
    one_line = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            line = line.split("#", 1)[0].strip()
            options = re.search(r"\[([^]]*)\]", line)
            signed_by = ""
            if options:
                match = re.search(r"signed-by=(\S+)", options.group(1))
                signed_by = match.group(1) if match else ""
                line = line.replace(options.group(0), " ")
            words = line.split()
            if len(words) >= 3 and words[0] == "deb":
                found.append((words[1], [words[2]], words[3:], signed_by))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in _deb822_stanzas(path.read_text(errors="replace")):
            if "deb" not in stanza.get("types", "").split():
                continue
            if stanza.get("enabled", "yes").lower() == "no":
                continue
            for uri in stanza.get("uris", "").split():
                found.append((uri, stanza.get("suites", "").split(),
                              stanza.get("components", "").split(),
                              stanza.get("signed-by", "")))
    return found


def find_mirror(etc_apt: Path = Path("/etc/apt")) -> tuple[str, str]:
    """The Debian archive mirror this machine's apt uses, and its keyring ('' if none given).

    The first ``deb`` source with component ``main`` for a plain Debian suite (not
    ``-security``, ``-updates``, ``-backports``) whose URI ends in ``/debian``.
    ``PCISPLIT_VM_MIRROR`` overrides the URI.
    """
    override = os.environ.get("PCISPLIT_VM_MIRROR")
    if override:
        return override, ""
    for uri, suites, components, signed_by in _apt_sources(etc_apt):
        plain = [s for s in suites if "-" not in s and "/" not in s]
        if plain and "main" in components and uri.rstrip("/").endswith("/debian"):
            keyring = signed_by if signed_by.startswith("/") else ""
            return uri.rstrip("/"), keyring
    raise VmImageError(
        f"no Debian archive found in {etc_apt}/sources.list or {etc_apt}/sources.list.d "
        "(a 'deb' source for a Debian suite with component main, URI ending in /debian); "
        "set PCISPLIT_VM_MIRROR to a Debian mirror URL")


# --- running things ---------------------------------------------------------------------------

def _run(argv: Sequence[str], step: str, log: Path, *, retry: bool = False,
         env: dict[str, str] | None = None) -> str:
    """Run ``argv`` with its output in ``log``; once more if ``retry``; raise naming ``step``."""
    attempts = 2 if retry else 1
    for attempt in range(1, attempts + 1):
        with log.open("ab") as out:
            out.write(f"\n$ {' '.join(argv)}\n".encode())
            out.flush()
            result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=out, env=env,
                                    check=False)
            out.write(result.stdout)
        if result.returncode == 0:
            return result.stdout.decode(errors="replace")
        if attempt < attempts:
            _log(f"{step} failed (exit status {result.returncode}); trying once more")
    tail = log.read_text(errors="replace").splitlines()[-15:]
    raise VmImageError(f"{step} failed (exit status {result.returncode}); the end of its log "
                       f"{log}:\n" + "\n".join(tail))


def chroot_argv(root: Path, argv: Sequence[str],
                binds: Sequence[tuple[Path, str]] = ()) -> list[str]:
    """``argv`` run inside ``root`` through chroot, in a private mount namespace.

    The namespace gets ``/proc``, the host's ``/dev`` and ``/sys``, fresh tmpfs on ``/tmp``
    and ``/run``, and each ``(host_path, path_in_root)`` of ``binds`` (targets under
    ``/run`` or ``/tmp`` are created in those tmpfs); all of it vanishes with the process.
    The process that runs ``argv`` is the one started (``exec`` all the way), so its pid
    and exit status are ``argv``'s.
    """
    script = [
        "set -e",
        'r="$1"; shift',
        'mount -t proc proc "$r/proc"',
        'mount --rbind /dev "$r/dev"',
        'mount --rbind /sys "$r/sys"',
        'mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"',
        'mount -t tmpfs -o mode=755 tmpfs "$r/run"',
    ]
    args: list[str] = []
    for index, (source, target) in enumerate(binds):
        if not target.startswith(("/run/", "/tmp/")):
            raise VmImageError(f"bind target {target!r} must lie under /run/ or /tmp/ in the root")
        src, dst = f"${{{index * 2 + 1}}}", f"${{{index * 2 + 2}}}"
        script.append(f'if [ -d "{src}" ]; then mkdir -p "$r{dst}"; '
                      f'else mkdir -p "$(dirname "$r{dst}")"; : > "$r{dst}"; fi')
        script.append(f'mount --bind "{src}" "$r{dst}"')
        args += [str(source), target]
    count = len(binds) * 2
    script.append(f"shift {count}" if count else ":")
    script.append('exec chroot "$r" "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script),
            "pcisplit-vm", str(root), *args, *argv]


# --- the image ----------------------------------------------------------------------------------

class Image:
    """The built image: paths to its parts, and whether each is present and current."""

    def __init__(self, base: Path | None = None) -> None:
        self.base = base if base is not None else cache_dir()
        self.root = self.base / "root"
        self.boot = self.base / "boot"
        self.kernel = self.boot / "vmlinuz"
        self.initramfs = self.boot / "initramfs.gz"

    def stamp(self, part: Path) -> dict[str, object] | None:
        """The stamp of ``part`` (``self.root`` or ``self.boot``), or None when absent."""
        try:
            loaded = json.loads((part / "stamp.json").read_text())
        except (OSError, ValueError):
            return None
        return loaded if isinstance(loaded, dict) else None

    def require(self) -> None:
        """Raise :class:`VmImageError` saying how to build the image if a part is missing."""
        for part in (self.root, self.boot):
            if self.stamp(part) is None:
                raise VmImageError(
                    f"the test VM image is missing or incomplete ({part} has no stamp.json): "
                    "build it with `make vm-image` (as root; it downloads Debian packages, "
                    "about a minute and 400 MB)")


def _root_recipe(mirror: str) -> dict[str, object]:
    return {"recipe": ROOT_RECIPE, "suite": SUITE, "backports": BACKPORTS, "mirror": mirror,
            "packages": list(ROOT_PACKAGES)}


def _boot_recipe(root_stamp: dict[str, object]) -> dict[str, object]:
    init = (HERE / "init.sh").read_bytes()
    return {"recipe": BOOT_RECIPE, "modules": list(MODULES),
            "init_sha256": hashlib.sha256(init).hexdigest(),
            "root_built": root_stamp.get("built")}


def _current(stamp: dict[str, object] | None, recipe: dict[str, object]) -> bool:
    return stamp is not None and all(stamp.get(key) == value for key, value in recipe.items())


@contextlib.contextmanager
def _scratch(final: Path) -> Iterator[Path]:
    """A fresh scratch directory beside ``final``, renamed onto it when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f"{final.name}.*-tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = final.parent / f"{final.name}.{os.getpid()}-tmp"
    scratch.mkdir()
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    old = final.parent / f"{final.name}.{os.getpid()}.old-tmp"
    if final.exists():
        final.rename(old)
    scratch.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def qemu_version_ok(version_text: str) -> tuple[int, int] | None:
    """The (major, minor) in ``qemu-system-x86_64 --version`` output when >= :data:`QEMU_MIN`."""
    match = re.search(r"QEMU emulator version (\d+)\.(\d+)", version_text)
    if match is None:
        return None
    version = (int(match.group(1)), int(match.group(2)))
    return version if version >= QEMU_MIN else None


def _need_root() -> None:
    if os.geteuid() != 0:
        raise VmImageError("building the test VM image needs root (debootstrap, chroot and "
                           "mount namespaces): run `make vm-image` as root")


def _host_tools(log: Path) -> None:
    missing = [tool for tool, package in (("debootstrap", "debootstrap"),
                                          ("unshare", "util-linux"), ("dpkg-deb", "dpkg"))
               if shutil.which(tool) is None]
    if missing == ["debootstrap"]:
        _log("installing debootstrap from the host's Debian")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], "apt-get update (for debootstrap)", log, retry=True)
        _run(["apt-get", "install", "-y", "-qq", "debootstrap"], "apt-get install debootstrap",
             log, retry=True, env=env)
    elif missing:
        raise VmImageError(f"the host lacks {', '.join(missing)}: the test VM image is built "
                           "with debootstrap, unshare (util-linux) and dpkg-deb on Debian")


def _in_root(root: Path, argv: Sequence[str]) -> list[str]:
    return chroot_argv(root, ["env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C.UTF-8",
                              "PATH=/usr/sbin:/usr/bin:/sbin:/bin", *argv])


def _build_root(image: Image, mirror: str, keyring: str, logs: Path) -> None:
    log = logs / "root.log"
    log.write_text("")
    started = time.monotonic()
    with _scratch(image.root) as root:
        _log(f"debootstrap --variant=minbase {SUITE} from {mirror} (about 40 s)")
        argv = ["debootstrap", "--variant=minbase"]
        if keyring:
            argv.append(f"--keyring={keyring}")
        argv += [SUITE, str(root), mirror]

        def debootstrap() -> None:
            try:
                _run(argv, f"debootstrap of {SUITE}", log)
            except VmImageError:
                for child in root.iterdir():  # a second try starts from an empty directory
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() \
                        else child.unlink()
                _log(f"debootstrap of {SUITE} failed; trying once more")
                _run(argv, f"debootstrap of {SUITE}", log)

        debootstrap()
        (root / "etc/apt/sources.list.d/pcisplit-backports.list").write_text(
            f"deb {mirror} {BACKPORTS} main\n")
        _log(f"apt-get install {' '.join(ROOT_PACKAGES)} (QEMU from {BACKPORTS})")
        _run(_in_root(root, ["apt-get", "update", "-qq"]), f"apt-get update in the {SUITE} root",
             log, retry=True)
        _run(_in_root(root, ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                             "-t", BACKPORTS, *ROOT_PACKAGES]),
             f"apt-get install of {' '.join(ROOT_PACKAGES)} in the {SUITE} root", log, retry=True)
        version_text = _run(_in_root(root, ["qemu-system-x86_64", "--version"]),
                            "qemu-system-x86_64 --version", log)
        version = qemu_version_ok(version_text)
        if version is None:
            raise VmImageError(f"{BACKPORTS} gave a QEMU older than "
                               f"{QEMU_MIN[0]}.{QEMU_MIN[1]} ({version_text.strip()!r}); "
                               "vfio-user-pci needs 10.1 or later")
        _run(_in_root(root, ["qemu-system-x86_64", "-device", "vfio-user-pci,help"]),
             "checking QEMU's vfio-user-pci device", log)
        versions = _run(_in_root(root, ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n",
                                        *ROOT_PACKAGES]), "dpkg-query", log)
        _run(_in_root(root, ["apt-get", "clean"]), "apt-get clean", log)
        stamp = {**_root_recipe(mirror), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()),
                 "qemu": version_text.splitlines()[0].strip(),
                 "versions": dict(line.split(" ", 1) for line in versions.splitlines() if line)}
        (root / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    _log(f"root ready in {time.monotonic() - started:.0f} s: {stamp['qemu']}")


def _decompress(name: str, data: bytes) -> bytes:
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise VmImageError(f"kernel module {name} is compressed in a way this build cannot read "
                       "(only .ko, .ko.xz and .ko.gz)")


def _module_name(member: str) -> str:
    base = member.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _read_kernel_package(deb: Path, log: Path) -> tuple[str, bytes, dict[str, tuple[str, bytes]]]:
    """(kernel release, vmlinuz, {module name: (member, compressed bytes)}) of a linux-image deb."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=log.open("ab"))
    assert proc.stdout is not None
    vmlinuz: tuple[str, bytes] | None = None
    modules: dict[str, tuple[str, bytes]] = {}
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            name = member.name.lstrip("./")
            if not member.isfile():
                continue
            if re.fullmatch(r"boot/vmlinuz-.+", name):
                extracted = tar.extractfile(member)
                assert extracted is not None
                vmlinuz = (name.split("vmlinuz-", 1)[1], extracted.read())
            elif re.search(r"/kernel/.+\.ko(\.[a-z]+)?$", name):
                extracted = tar.extractfile(member)
                assert extracted is not None
                modules[_module_name(name)] = (name, extracted.read())
    if proc.wait() != 0:
        raise VmImageError(f"dpkg-deb could not read {deb} (see {log})")
    if vmlinuz is None:
        raise VmImageError(f"{deb.name} holds no boot/vmlinuz-*: is it a linux-image package?")
    return vmlinuz[0], vmlinuz[1], modules


def _in_root_path(root: Path, path: str) -> Path:
    """``path`` inside ``root``, its symbolic links resolved as the root sees them."""
    current = root
    parts = [p for p in path.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise VmImageError(f"{path} in the root: too many symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p] + parts
        elif part == "..":
            current = current.parent if current != root else root
        else:
            current = candidate
    return current


def _ldd(root: Path, program: str, log: Path) -> list[str]:
    """The absolute paths (inside ``root``) of the libraries ``program`` loads, and its loader."""
    output = _run(_in_root(root, ["ldd", program]), f"ldd {program} in the root", log)
    paths = []
    for line in output.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            paths.append(match.group(1))
    if not paths:
        raise VmImageError(f"ldd found no libraries for {program} in the root")
    return paths


def _build_boot(image: Image, root_stamp: dict[str, object], logs: Path) -> None:
    log = logs / "boot.log"
    log.write_text("")
    started = time.monotonic()
    root = image.root
    with _scratch(image.boot) as boot:
        depends = _run(_in_root(root, ["apt-cache", "depends", "linux-image-amd64"]),
                       "apt-cache depends linux-image-amd64", log)
        match = re.search(r"Depends:\s*(linux-image-\S+)", depends)
        if match is None:
            raise VmImageError("linux-image-amd64 in the root names no kernel package "
                               f"(apt-cache depends said {depends.strip()!r})")
        packages = [match.group(1), "busybox-static"]
        download = root / "var/tmp/pcisplit-debs"
        shutil.rmtree(download, ignore_errors=True)
        download.mkdir(parents=True)
        os.chmod(download, 0o777)  # apt downloads as _apt where it can
        _log(f"downloading {' '.join(packages)} ({SUITE})")
        try:
            _run(_in_root(root, ["sh", "-c", 'cd /var/tmp/pcisplit-debs && apt-get download '
                                 '-qq "$@"', "sh", *packages]),
                 f"apt-get download {' '.join(packages)}", log, retry=True)
            debs = {deb.name.split("_", 1)[0]: deb for deb in download.glob("*.deb")}
            missing = [p for p in packages if p not in debs]
            if missing:
                raise VmImageError(f"apt-get download gave no .deb for {', '.join(missing)}")
            release, vmlinuz, modules = _read_kernel_package(debs[packages[0]], log)
            busybox_tar = subprocess.run(["dpkg-deb", "--fsys-tarfile",
                                          str(debs["busybox-static"])],
                                         capture_output=True, check=False)
            versions = {deb.name.split("_", 1)[0]: deb.name.split("_")[1].replace("%3a", ":")
                        for deb in debs.values()}
        finally:
            shutil.rmtree(download, ignore_errors=True)
        if busybox_tar.returncode != 0:
            raise VmImageError("dpkg-deb could not read the busybox-static package: "
                               + busybox_tar.stderr.decode(errors="replace"))
        with tarfile.open(fileobj=io.BytesIO(busybox_tar.stdout)) as tar:
            member = next((m for m in tar if m.name.lstrip("./") in ("bin/busybox",
                                                                     "usr/bin/busybox")), None)
            extracted = tar.extractfile(member) if member is not None else None
            if extracted is None:
                raise VmImageError("the busybox-static package holds no bin/busybox")
            busybox = extracted.read()

        def read(name: str) -> bytes:
            return _decompress(*modules[name])

        order = initramfs.module_closure(MODULES, {name: name for name in modules}, read)
        entries = _initramfs_entries(root, release, busybox, order, read, log)
        (boot / "initramfs.gz").write_bytes(gzip.compress(initramfs.cpio(entries), 6, mtime=0))
        (boot / "vmlinuz").write_bytes(vmlinuz)
        stamp = {**_boot_recipe(root_stamp), "kernel_release": release, "versions": versions,
                 "module_order": order}
        (boot / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    _log(f"kernel {release} and initramfs ready in {time.monotonic() - started:.0f} s")


def _initramfs_entries(root: Path, release: str, busybox: bytes, order: list[str],
                       read: Callable[[str], bytes], log: Path) -> list[initramfs.Entry]:
    mod_dir = f"lib/modules/{release}"
    entries = [initramfs.directory(d) for d in (
        "bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "lib", "lib64",
        "usr", "usr/bin", "usr/sbin", "usr/lib", "usr/share", "usr/share/misc", "lib/modules",
        mod_dir, "pcisplit")]
    entries += [
        initramfs.chardev("dev/console", 5, 1),
        initramfs.file("bin/busybox", busybox, 0o755),
        initramfs.file("init", (HERE / "init.sh").read_bytes(), 0o755),
        initramfs.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        initramfs.file("etc/group", b"root:x:0:\n"),
    ]
    dep_lines = []
    for name in order:
        ko = read(name)
        entries.append(initramfs.file(f"{mod_dir}/{name}.ko", ko))
        deps = initramfs.module_depends(ko, name)
        dep_lines.append(f"{name}.ko:" + "".join(f" {d.replace('-', '_')}.ko" for d in deps))
    entries.append(initramfs.file(f"{mod_dir}/modules.dep", "\n".join(dep_lines).encode() + b"\n"))
    # pciutils from the root: the programs, the libraries they load (as regular files at the
    # same paths) and the ids database.
    libraries: dict[str, bytes] = {}
    for program in ("/usr/bin/lspci", "/usr/bin/setpci"):
        binary = _in_root_path(root, program).read_bytes()
        entries.append(initramfs.file(program.lstrip("/"), binary, 0o755))
        for lib in _ldd(root, program, log):
            try:
                libraries[lib] = _in_root_path(root, lib).read_bytes()
            except OSError as exc:
                raise VmImageError(f"{lib}, which {program} loads, cannot be read from the "
                                   f"root: {exc}") from exc
    made = {e.path for e in entries}
    for lib, data in sorted(libraries.items()):
        parts = lib.lstrip("/").split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in made:
                entries.append(initramfs.directory(parent))
                made.add(parent)
        entries.append(initramfs.file(lib.lstrip("/"), data, 0o755))
    ids = _in_root_path(root, "/usr/share/misc/pci.ids")
    if ids.is_file():
        entries.append(initramfs.file("usr/share/misc/pci.ids", ids.read_bytes()))
    return entries


def build(image: Image | None = None, *, force: bool = False) -> Image:
    """Make ``image`` (default: :func:`cache_dir`) current; a no-op when both stamps are."""
    image = image if image is not None else Image()
    mirror, keyring = find_mirror()
    image.base.mkdir(parents=True, exist_ok=True)
    with (image.base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time per image directory
        _build_locked(image, mirror, keyring, force)
    return image


def _build_locked(image: Image, mirror: str, keyring: str, force: bool) -> None:
    root_stamp = image.stamp(image.root)
    if force or not _current(root_stamp, _root_recipe(mirror)):
        _need_root()
        logs = image.base / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _host_tools(logs / "root.log")
        _build_root(image, mirror, keyring, logs)
        root_stamp = image.stamp(image.root)
    assert root_stamp is not None
    if force or not _current(image.stamp(image.boot), _boot_recipe(root_stamp)):
        _need_root()
        logs = image.base / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _build_boot(image, root_stamp, logs)
