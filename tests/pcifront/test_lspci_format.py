"""pcifront's lspci text against the real lspci, byte for byte.

The ground truth is pciutils' own ``lspci -F FILE``: for every real dump in
``tests/data/pcidata`` and for synthetic devices built to hit each formatting
rule, our formatter must print exactly what lspci prints for the same bytes.
lspci runs with ``-i`` pointing at the same ``pci.ids`` our parser reads, and
with udev's hwdb switched off so names come from that file alone.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from pcifront.tools.lspci import (
    DeviceFilter,
    LspciOptionError,
    filter_devices,
    format_listing,
    needs_domains,
    render_lspci,
)
from pcifront.tools.pciids import PciIds
from shared.errors import PciError
from shared.pci import PciAddress, parse_dump

PCI_IDS = "/usr/share/misc/pci.ids"
DATA = Path(__file__).resolve().parents[1] / "data" / "pcidata"
DUMPS = sorted(path for path in DATA.glob("*.txt") if not path.name.endswith("vvv.txt"))
LSPCI = shutil.which("lspci")

needs_lspci = pytest.mark.skipif(
    LSPCI is None, reason="the real lspci is not installed (apt-get install pciutils)"
)
needs_ids = pytest.mark.skipif(
    not Path(PCI_IDS).is_file(), reason=f"{PCI_IDS} is missing (apt-get install pci.ids)"
)

# (lspci switches, numeric level, dump bytes)
MODES: dict[str, tuple[tuple[str, ...], int, int]] = {
    "names": ((), 0, 0),
    "n": (("-n",), 1, 0),
    "nn": (("-nn",), 2, 0),
    "x": (("-x",), 0, 64),
    "xxx": (("-xxx",), 0, 256),
    "xxxx": (("-xxxx",), 0, 4096),
    "nn-xxx": (("-nn", "-xxx"), 2, 256),
    "n-xxxx": (("-n", "-xxxx"), 1, 4096),
}


@dataclass(frozen=True)
class Dev:
    """The smallest thing the formatter accepts: an address and a config image."""

    address: PciAddress
    config: bytes | None


def load_dump(path: Path) -> list[Dev]:
    return [Dev(entry.address, entry.data) for entry in parse_dump(path.read_text())]


def run_lspci(dump: Path, *switches: str) -> subprocess.CompletedProcess[str]:
    assert LSPCI is not None
    command = [LSPCI, "-O", "hwdb.disable=1", "-i", PCI_IDS, "-F", str(dump), *switches]
    # stderr may hold "Unable to load libkmod resources" for -v: not compared.
    return subprocess.run(command, capture_output=True, text=True, check=False)


def lspci_stdout(dump: Path, *switches: str) -> str:
    result = run_lspci(dump, *switches)
    assert result.returncode == 0, result.stderr
    return result.stdout


def write_dump(path: Path, devices: Sequence[Dev]) -> Path:
    """Write devices as a full-size dump lspci -F can read (the header text is ignored)."""
    path.write_text(format_listing(devices, ids=None, numeric=1, dump_bytes=4096))
    return path


def make_config(
    vendor: int,
    device: int,
    class_code: int,
    *,
    revision: int = 0,
    header_type: int = 0,
    size: int = 256,
    seed: int = 0,
) -> bytes:
    """A config image with the given identity and deterministic filler elsewhere."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[0:4] = (vendor | device << 16).to_bytes(4, "little")
    data[4:8] = bytes(4)  # command/status: no capability list, nothing enabled
    data[8] = revision
    data[9:12] = class_code.to_bytes(3, "little")
    data[0x0E] = header_type
    data[0x34] = 0
    return bytes(data)


@pytest.fixture(scope="module")
def ids() -> PciIds:
    loaded = PciIds.load(PCI_IDS)
    if loaded is None:
        pytest.skip(f"{PCI_IDS} is missing")
    return loaded


# --------------------------------------------------------------- without lspci


def edu() -> Dev:
    return Dev(PciAddress(0, 0, 0, 0), make_config(0x1234, 0x11E8, 0x00FF00, revision=0x10))


@needs_ids
def test_edu_line_with_names(ids: PciIds) -> None:
    # The line from the issue: pci.ids has no vendor 1234.
    expected = "00:00.0 Unclassified device [00ff]: Device 1234:11e8 (rev 10)\n"
    assert format_listing([edu()], ids=ids) == expected


@needs_ids
def test_edu_numeric_and_mixed(ids: PciIds) -> None:
    assert format_listing([edu()], ids=ids, numeric=1) == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
    assert format_listing([edu()], ids=ids, numeric=2) == (
        "00:00.0 Unclassified device [00ff]: Device [1234:11e8] (rev 10)\n"
    )


def test_without_database_names_are_numbers_with_words() -> None:
    assert format_listing([edu()], ids=None) == "00:00.0 Class 00ff: Device 1234:11e8 (rev 10)\n"
    assert format_listing([edu()], ids=None, numeric=2) == (
        "00:00.0 Class [00ff]: Device [1234:11e8] (rev 10)\n"
    )


def test_hex_dump_layout_and_blank_line() -> None:
    config = bytes(range(256)) * 16
    text = format_listing([Dev(PciAddress(0, 0, 3, 0), config)], ids=None, dump_bytes=4096)
    lines = text.split("\n")
    assert lines[1] == "00: 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f"
    assert lines[16].startswith("f0: f0 f1")
    assert lines[17].startswith("100: 00 01")
    assert lines[256].startswith("ff0: f0 f1")
    assert lines[257:] == ["", ""]  # the blank line after the device, then the end


def test_dump_is_limited_to_the_image() -> None:
    short = Dev(PciAddress(0, 0, 1, 0), make_config(0x8086, 0x1234, 0x020000, size=64))
    assert len(format_listing([short], ids=None, dump_bytes=4096).splitlines()) == 1 + 4 + 1


def test_cardbus_bridge_shows_128_bytes_with_x() -> None:
    cardbus = Dev(PciAddress(0, 2, 0, 0), make_config(0x1217, 0x7223, 0x060700, header_type=0x82))
    assert len(format_listing([cardbus], ids=None, dump_bytes=64).splitlines()) == 1 + 8 + 1


def test_sorted_by_address_and_stable() -> None:
    first = Dev(PciAddress(0, 1, 0, 0), make_config(0x8086, 0x0001, 0x020000))
    second = Dev(PciAddress(0, 1, 0, 0), make_config(0x8086, 0x0002, 0x020000))
    early = Dev(PciAddress(0, 0, 0x1F, 7), make_config(0x8086, 0x0003, 0x020000))
    lines = format_listing([first, second, early], ids=None, numeric=1).splitlines()
    assert [line.split()[2] for line in lines] == ["8086:0003", "8086:0001", "8086:0002"]


def test_domains_follow_the_whole_bus() -> None:
    home = Dev(PciAddress(0, 0, 2, 0), make_config(0x8086, 0x0001, 0x020000))
    away = Dev(PciAddress(5, 0, 0, 0), make_config(0x8086, 0x0002, 0x020000))
    assert format_listing([home], ids=None, numeric=1).startswith("00:02.0 ")
    assert format_listing([home, away], ids=None, numeric=1).startswith("0000:00:02.0 ")
    assert needs_domains([home, away]) and not needs_domains([home])
    # lspci decides before filtering: a hidden device with a domain still counts.
    assert render_lspci([home, away], slot="00:02", ids=None, numeric=1).startswith("0000:")


def test_text_addresses_are_accepted() -> None:
    @dataclass(frozen=True)
    class TextDev:
        address: str
        config: bytes

    device = TextDev("0000:00:04.0", make_config(0x1AF4, 0x1000, 0x020000))
    assert format_listing([device], ids=None, numeric=1) == "00:04.0 0200: 1af4:1000\n"


def test_missing_or_short_config_is_a_clear_error() -> None:
    with pytest.raises(PciError, match="no config image"):
        format_listing([Dev(PciAddress(0, 0, 0, 0), None)], ids=None)
    with pytest.raises(PciError, match="64-byte standard header"):
        format_listing([Dev(PciAddress(0, 0, 0, 0), bytes(16))], ids=None)


def test_bad_options_are_refused() -> None:
    with pytest.raises(LspciOptionError, match="dump size"):
        format_listing([edu()], ids=None, dump_bytes=100)
    with pytest.raises(LspciOptionError, match="numeric"):
        format_listing([edu()], ids=None, numeric=-1)


def test_empty_bus_prints_nothing() -> None:
    assert format_listing([], ids=None, dump_bytes=256) == ""


@pytest.mark.parametrize(
    ("slot", "reason"),
    [
        ("0x1c", "Invalid slot number"),
        ("20", "Invalid slot number"),
        ("1:2:3:4", "Too many fields"),
        ("100:", "Invalid bus number"),
        ("80000000::", "Invalid domain number"),
        ("1.2.3", "Invalid slot/function number"),
        ("1c.8", "Invalid function number"),
        ("a" * 64, "Expression too long"),
    ],
)
def test_bad_slot_selectors(slot: str, reason: str) -> None:
    with pytest.raises(LspciOptionError) as caught:
        DeviceFilter.parse(slot=slot)
    assert caught.value.reason == reason
    assert caught.value.lspci_message == f"-s: {reason}"


def test_filter_fields() -> None:
    assert DeviceFilter.parse(slot="1:2:3.4") == DeviceFilter(1, 2, 3, 4)
    assert DeviceFilter.parse(slot="*:.7") == DeviceFilter(function=7)
    assert DeviceFilter.parse(vendor_device="::03xx") == DeviceFilter(
        class_code=0x0300, class_mask=0xFFFF_FF00
    )
    # 32-bit wrap-around, as in lib/filter.c: nine digits can come out as 0.
    assert DeviceFilter.parse(slot="100000000::") == DeviceFilter(domain=0)
    assert filter_devices([edu()], slot="1:", vendor_device=None) == []
    assert filter_devices([edu()], slot=None, vendor_device="1234:11e8::00") == [edu()]


# ----------------------------------------------------------- against real lspci


@needs_lspci
@needs_ids
@pytest.mark.lspci
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dump", DUMPS, ids=[path.stem for path in DUMPS])
def test_every_dump_matches_lspci(dump: Path, mode: str, ids: PciIds) -> None:
    switches, numeric, dump_bytes = MODES[mode]
    ours = format_listing(load_dump(dump), ids=ids, numeric=numeric, dump_bytes=dump_bytes)
    assert ours == lspci_stdout(dump, *switches)


def test_the_dumps_are_there() -> None:
    # Guards the parametrized test above against silently running on nothing.
    assert len(DUMPS) == 26


def synthetic_devices() -> list[Dev]:
    """One device per formatting rule lspci has."""
    specs: list[tuple[int, int, int, int, int, int]] = [
        # vendor, device, class, revision, header type, size
        (0x1234, 0x11E8, 0x00FF00, 0x10, 0x00, 4096),  # edu: unknown vendor, base class only
        (0x10EC, 0xFFFE, 0x020000, 0x00, 0x00, 256),  # known vendor, unknown device, rev 0
        (0x0002, 0x0003, 0x200000, 0x01, 0x00, 256),  # unknown class and vendor
        (0x8086, 0x1502, 0x064200, 0xFF, 0x80, 256),  # known base class, unknown subclass
        (0x15B3, 0x634A, 0x0C0330, 0xA0, 0x00, 256),  # 131-character name: cut to 127
        (0x1C63, 0x0008, 0x020000, 0x02, 0x00, 256),  # 124 characters: cut only with -nn
        (0x1217, 0x7223, 0x060700, 0x00, 0x02, 256),  # CardBus bridge: -x shows 128 bytes
        (0x1217, 0x7223, 0x060700, 0x00, 0x82, 64),  # CardBus, only 64 bytes known
        (0x8086, 0x10C9, 0x020000, 0x01, 0x00, 64),  # 64-byte image with -xxx/-xxxx
        (0xFFFF, 0xFFFF, 0xFFFFFF, 0xFF, 0x7F, 256),  # all ones
        (0x0000, 0x0000, 0x000000, 0x00, 0x00, 256),  # all zeros
    ]
    devices = []
    for index, (vendor, device, klass, revision, header, size) in enumerate(specs):
        config = make_config(
            vendor, device, klass, revision=revision, header_type=header, size=size, seed=index
        )
        devices.append(Dev(PciAddress(0, index >> 3, index & 7, index % 8), config))
    return devices


@needs_lspci
@needs_ids
@pytest.mark.lspci
@pytest.mark.parametrize("mode", list(MODES))
def test_synthetic_devices_match_lspci(tmp_path: Path, mode: str, ids: PciIds) -> None:
    devices = synthetic_devices()
    dump = write_dump(tmp_path / "synthetic.txt", devices)
    switches, numeric, dump_bytes = MODES[mode]
    ours = format_listing(devices, ids=ids, numeric=numeric, dump_bytes=dump_bytes)
    assert ours == lspci_stdout(dump, *switches)


@needs_lspci
@pytest.mark.lspci
def test_without_database_matches_lspci(tmp_path: Path) -> None:
    devices = synthetic_devices()
    dump = write_dump(tmp_path / "synthetic.txt", devices)
    missing = str(tmp_path / "none.ids")
    for numeric, switches in ((0, ()), (2, ("-nn",))):
        result = subprocess.run(
            [str(LSPCI), "-O", "hwdb.disable=1", "-i", missing, "-F", str(dump), *switches],
            capture_output=True,
            text=True,
            check=True,
        )
        assert format_listing(devices, ids=None, numeric=numeric) == result.stdout


@needs_lspci
@needs_ids
@pytest.mark.lspci
@pytest.mark.slow
def test_every_name_in_the_database_matches_lspci(tmp_path: Path, ids: PciIds) -> None:
    """One 64-byte device per pci.ids device entry and per class: one lspci run."""
    stats = ids.statistics()
    identities = ids.device_ids()
    # Named subclasses, plus an unnamed subclass (fe) of every named base class.
    classes = [base << 16 | (0xFE if sub is None else sub) << 8 for base, sub in ids.class_ids()]
    assert len(identities) == stats["devices"]
    devices = []
    for index, (vendor, device) in enumerate(identities):
        klass = classes[index % len(classes)]
        config = make_config(vendor, device, klass, revision=index & 0xFF, size=64, seed=index)
        address = PciAddress(0, index >> 8, (index >> 3) & 0x1F, index & 7)
        devices.append(Dev(address, config))
    dump = write_dump(tmp_path / "all.txt", devices)
    for switches, numeric in (((), 0), (("-nn",), 2)):
        assert format_listing(devices, ids=ids, numeric=numeric) == lspci_stdout(dump, *switches)


# ----------------------------------------------------------------- filtering


def multi_bus(*, domain_zero_only: bool = False) -> list[Dev]:
    """Every dump on one bus; repeated addresses move to device 0x10 and up."""
    devices: list[Dev] = []
    seen: set[PciAddress] = set()
    for path in DUMPS:
        for device in load_dump(path):
            address = device.address
            if domain_zero_only and address.domain:
                continue
            bump = 0x10
            while address in seen:
                address = replace(device.address, device=bump)
                bump += 1
            seen.add(address)
            devices.append(Dev(address, device.config))
    return devices


SLOT_SELECTORS = [
    "", "00:", "0:", "1c", ".0", ":.4", "5::", "0005::", "*:*:*.*", "0001:21:01", "1c.*",
    "*.2", "02:", "2:10", "2:11.0", "::", "100000000::", "7fffffff::", ":1f.", "3.4",
    "0x1c", " 1c", "+1c", "-1", "1:2:3:4", "20", "ffffffff::", "80000000::", "1.2.3",
    "1c.8", "100:", "g", "a" * 64,
]  # fmt: skip
ID_SELECTORS = [
    ":", "::", ":::", "8086:", ":1502", "8086:1502", "10de::03xx", "::03xx", "::0300", "::3",
    "::x", "::0xff", ":::01", ":::02", "::0c03:20", "*:*:*:*", "10DE:", "::0604:0",
    "1000:0072::", "::01xX",
    "", "::::", "10000:", "0x8086:", "1:2:3:4:5", "::xxxxx", ":::100", ":10000", "a" * 70,
]  # fmt: skip


def compare_with_lspci(
    dump: Path, devices: list[Dev], ids: PciIds, slot: str | None, vendor_device: str | None
) -> None:
    switches = ["-n"]
    if slot is not None:
        switches += ["-s", slot]
    if vendor_device is not None:
        switches += ["-d", vendor_device]
    real = run_lspci(dump, *switches)
    if real.returncode == 0:
        ours = render_lspci(devices, slot=slot, vendor_device=vendor_device, numeric=1, ids=ids)
        assert ours == real.stdout
    else:
        with pytest.raises(LspciOptionError) as caught:
            render_lspci(devices, slot=slot, vendor_device=vendor_device, numeric=1, ids=ids)
        assert f"lspci: {caught.value.lspci_message}" == real.stderr.strip()


@needs_lspci
@needs_ids
@pytest.mark.lspci
@pytest.mark.parametrize("domain_zero_only", [False, True], ids=["domains", "no-domains"])
def test_slot_filter_matches_lspci(tmp_path: Path, ids: PciIds, domain_zero_only: bool) -> None:
    devices = multi_bus(domain_zero_only=domain_zero_only)
    dump = write_dump(tmp_path / "multi.txt", devices)
    for selector in SLOT_SELECTORS:
        compare_with_lspci(dump, devices, ids, selector, None)


@needs_lspci
@needs_ids
@pytest.mark.lspci
def test_id_filter_matches_lspci(tmp_path: Path, ids: PciIds) -> None:
    devices = multi_bus()
    dump = write_dump(tmp_path / "multi.txt", devices)
    for selector in ID_SELECTORS:
        compare_with_lspci(dump, devices, ids, None, selector)


@needs_lspci
@needs_ids
@pytest.mark.lspci
def test_combined_filters_match_lspci(tmp_path: Path, ids: PciIds) -> None:
    devices = multi_bus()
    dump = write_dump(tmp_path / "multi.txt", devices)
    for slot, vendor_device in [
        ("00:", "8086:"),
        ("02:", "10de:"),
        ("1c", "::0604"),
        ("5::", "::03xx"),
        (".0", ":::00"),
        ("00:", "1002:"),
    ]:
        compare_with_lspci(dump, devices, ids, slot, vendor_device)


# ---------------------------------------------------------------- round trip


@needs_lspci
@needs_ids
@pytest.mark.lspci
@pytest.mark.parametrize("dump", DUMPS, ids=[path.stem for path in DUMPS])
def test_our_dump_decodes_like_the_original(tmp_path: Path, dump: Path, ids: PciIds) -> None:
    ours = tmp_path / "ours.txt"
    ours.write_text(format_listing(load_dump(dump), ids=ids, dump_bytes=4096))
    assert lspci_stdout(ours, "-vvv") == lspci_stdout(dump, "-vvv")


@needs_lspci
@needs_ids
@pytest.mark.lspci
def test_wide_domain_matches_lspci(tmp_path: Path, ids: PciIds) -> None:
    # Domains above 0xffff print with as many digits as they need.
    devices = [
        Dev(PciAddress(0x10000, 0, 1, 0), make_config(0x8086, 0x10C9, 0x020000, revision=1)),
        Dev(PciAddress(0, 0, 2, 0), make_config(0x1234, 0x11E8, 0x00FF00, revision=0x10)),
    ]
    dump = write_dump(tmp_path / "wide.txt", devices)
    for slot in (None, "10000::", "0::", "*::2"):
        compare_with_lspci(dump, devices, ids, slot, None)


@needs_lspci
@pytest.mark.lspci
def test_edu_dump_decodes_as_1234_11e8(tmp_path: Path) -> None:
    # The check: our -xxx output, read back by the real lspci -F, shows 1234:11e8.
    dump = tmp_path / "edu.txt"
    dump.write_text(format_listing([edu()], ids=None, dump_bytes=256))
    assert lspci_stdout(dump, "-n") == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
