"""lspci dump reader and writer: byte-for-byte round trips and precise errors."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _pci_testdata import DATA_DIR, DUMP_NAMES, dump_text

from shared.errors import DumpFormatError
from shared.pci import DumpEntry, PciAddress, format_dump, format_hex_lines, parse_dump

LSPCI = shutil.which("lspci")
needs_lspci = pytest.mark.skipif(LSPCI is None, reason="needs the real lspci (pciutils)")

#: 14 dumps are 4096 bytes and 12 are 256 bytes (SOURCES.md).
FULL_DUMPS = {name for name in DUMP_NAMES if dump_text(name).count("\n") > 20}


def test_all_dumps_are_present() -> None:
    assert len(DUMP_NAMES) == 26
    assert len(FULL_DUMPS) == 14
    assert (DATA_DIR / "SOURCES.md").is_file()


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_every_dump_round_trips_byte_for_byte(name: str) -> None:
    text = dump_text(name)
    entries = parse_dump(text)
    assert len(entries) == 1
    assert format_dump(entries) == text


@pytest.mark.parametrize("name", DUMP_NAMES)
def test_parsed_fields_match_the_text(name: str) -> None:
    text = dump_text(name)
    (entry,) = parse_dump(text)
    header = text.split("\n", 1)[0]
    assert entry.header == header
    assert entry.address == PciAddress.parse(header.split(" ", 1)[0])
    assert len(entry.data) == (4096 if name in FULL_DUMPS else 256)
    # Spot-check the bytes against the hex text independently of the parser.
    line_10 = next(line for line in text.splitlines() if line.startswith("10: "))
    assert entry.data[0x10:0x20] == bytes.fromhex(line_10[4:])
    assert entry.details == ()


def test_several_devices_in_one_dump_round_trip() -> None:
    text = "".join(dump_text(name) for name in DUMP_NAMES)
    entries = parse_dump(text)
    assert [e.header for e in entries] == [dump_text(n).split("\n", 1)[0] for n in DUMP_NAMES]
    assert format_dump(entries) == text


def test_domain_addresses_are_parsed() -> None:
    (entry,) = parse_dump(dump_text("nvme_samsung_a808_power9"))
    assert entry.address == PciAddress(0x31, 1, 0, 0)
    assert entry.header.startswith("0031:01:00.0 ")


def test_64_byte_dump() -> None:
    text = "\n".join(dump_text("xhci_intel_200series").split("\n")[:5]) + "\n\n"
    (entry,) = parse_dump(text)
    assert len(entry.data) == 64
    assert format_dump([entry]) == text


def test_empty_text_holds_no_devices() -> None:
    assert parse_dump("") == []
    assert parse_dump("\n\n  \n") == []


def test_uppercase_hex_crlf_and_missing_final_blank_are_accepted() -> None:
    text = dump_text("eth_intel_82579lm")
    (expected,) = parse_dump(text)
    header, rest = text.split("\n", 1)
    shouted = header + "\r\n" + rest.upper().replace("\n", "\r\n").rstrip("\r\n")
    (entry,) = parse_dump(shouted)
    assert entry == expected


def test_header_right_after_hex_lines_starts_a_new_device() -> None:
    first, second = dump_text("eth_intel_82579lm"), dump_text("xhci_intel_200series")
    entries = parse_dump(first.rstrip("\n") + "\n" + second)
    assert len(entries) == 2
    assert format_dump(entries) == first + second


def _lines(name: str = "xhci_intel_200series") -> list[str]:
    return dump_text(name).split("\n")


def _expect_error(text: str, line: int, *fragments: str) -> None:
    with pytest.raises(DumpFormatError) as info:
        parse_dump(text)
    message = str(info.value)
    assert message.startswith(f"line {line}:"), message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_hex_byte_names_the_line() -> None:
    lines = _lines()
    lines[3] = lines[3].replace(" 19 ", " 1g ")
    _expect_error("\n".join(lines), 4, "'1g'", "not a hex byte")


def test_missing_line_is_a_gap() -> None:
    lines = _lines()
    del lines[5]  # offset 40
    _expect_error("\n".join(lines), 6, "expected offset 40", "found 50", "missing")


def test_repeated_line_is_reported() -> None:
    lines = _lines()
    lines.insert(3, lines[2])
    _expect_error("\n".join(lines), 4, "expected offset 20", "found 10", "repeated")


def test_short_line_is_reported() -> None:
    lines = _lines()
    lines[2] = lines[2][:-3]
    _expect_error("\n".join(lines), 3, "15", "expected 16 hex bytes")


def test_long_line_is_reported() -> None:
    lines = _lines()
    lines[2] += " 00"
    _expect_error("\n".join(lines), 3, "17", "expected 16 hex bytes")


def test_missing_space_after_offset() -> None:
    lines = _lines()
    lines[2] = lines[2].replace("10: ", "10:", 1)
    _expect_error("\n".join(lines), 3, "expected a space")


def test_wrong_total_size_is_reported_where_the_device_ends() -> None:
    lines = _lines()
    del lines[10:17]  # keep 0x00-0x8f: 144 bytes
    _expect_error("\n".join(lines), 11, "144 bytes", "64, 128, 256, 4096")


def test_truncated_4096_byte_dump_with_line_f10_missing() -> None:
    # The damaged BD4 log SOURCES.md mentions: one line in the middle vanished.
    lines = _lines("eth_intel_82576_sriov")
    index = next(i for i, line in enumerate(lines) if line.startswith("f10: "))
    del lines[index]
    _expect_error("\n".join(lines), index + 1, "expected offset f10", "found f20")


def test_truncated_4096_byte_dump_missing_its_tail() -> None:
    lines = _lines("eth_intel_82576_sriov")
    index = next(i for i, line in enumerate(lines) if line.startswith("f10: "))
    text = "\n".join(lines[:index]) + "\n\n"
    _expect_error(text, index + 1, "3856 bytes", "missing")


def test_more_than_4096_bytes_is_rejected() -> None:
    lines = _lines("eth_intel_82576_sriov")
    lines.insert(257, "1000: " + " ".join(["00"] * 16))
    _expect_error("\n".join(lines), 258, "already holds 4096 bytes")


def test_header_without_hex_lines() -> None:
    _expect_error("00:14.0 USB controller: Intel\n\n", 1, "no hex lines")
    text = "00:14.0 USB controller: Intel\n" + dump_text("eth_intel_82579lm")
    _expect_error(text, 2, "has no hex lines")


def test_hex_lines_before_any_header() -> None:
    _expect_error("00: 86 80\n", 1, "device header")


def test_garbage_inside_a_device() -> None:
    lines = _lines()
    lines.insert(4, "this is not a dump line")
    _expect_error("\n".join(lines), 5, "hex line")


def test_detail_line_after_hex_lines() -> None:
    lines = _lines()
    lines.insert(4, "\tCapabilities: [40] nonsense")
    _expect_error("\n".join(lines), 5, "detail line")


def test_invalid_address_in_header() -> None:
    text = dump_text("xhci_intel_200series").replace("00:14.0", "00:24.0", 1)
    _expect_error(text, 1, "bad device address", "out of range")


def test_non_text_input_is_rejected() -> None:
    with pytest.raises(DumpFormatError, match="text"):
        parse_dump(b"00:14.0 x\n")  # type: ignore[arg-type]


def test_dump_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        parse_dump("garbage\n")


def test_format_hex_lines_layout() -> None:
    data = bytes(range(256)) * 16
    text = format_hex_lines(data)
    lines = text.splitlines()
    assert len(lines) == 256
    assert lines[0] == "00: " + " ".join(f"{i:02x}" for i in range(16))
    assert lines[15].startswith("f0: f0 f1")
    assert lines[16].startswith("100: 00 01")
    assert lines[-1].startswith("ff0: f0 f1")
    assert text.endswith("ff\n")
    assert format_hex_lines(b"") == ""


@pytest.mark.parametrize("size", [15, 17, 4112])
def test_format_hex_lines_rejects_partial_lines_and_oversize(size: int) -> None:
    with pytest.raises(DumpFormatError, match="multiple of 16"):
        format_hex_lines(bytes(size))


def test_entry_validation() -> None:
    addr = PciAddress(0, 0, 3, 0)
    with pytest.raises(DumpFormatError, match="144 bytes"):
        DumpEntry("00:03.0 x", addr, bytes(144))
    with pytest.raises(DumpFormatError, match="only for CardBus bridges"):
        DumpEntry("00:03.0 x", addr, bytes(128))
    with pytest.raises(DumpFormatError, match="must start with the device's address"):
        DumpEntry("00:04.0 x", addr, bytes(64))
    with pytest.raises(DumpFormatError, match="newlines"):
        DumpEntry("00:03.0 x\n", addr, bytes(64))


def test_for_device_builds_lspci_headers() -> None:
    data = bytes(256)
    entry = DumpEntry.for_device(PciAddress(0, 0, 3, 0), "Unclassified device [00ff]: x", data)
    assert entry.header == "00:03.0 Unclassified device [00ff]: x"
    assert DumpEntry.for_device(PciAddress(5, 2, 0, 0), "VGA", data).header == "0005:02:00.0 VGA"
    forced = DumpEntry.for_device(PciAddress(0, 0, 3, 0), "x", data, show_domain=True)
    assert forced.header == "0000:00:03.0 x"
    assert forced.config_space().size == 256


@needs_lspci
@pytest.mark.lspci
@pytest.mark.parametrize("flag", ["-x", "-xxx", "-xxxx"])
@pytest.mark.parametrize("name", ["xhci_intel_200series", "eth_intel_82576_sriov"])
def test_writer_matches_real_lspci(flag: str, name: str, tmp_path: Path) -> None:
    """Our formatting of a prefix of the data is what lspci prints for that flag."""
    assert LSPCI is not None
    (entry,) = parse_dump(dump_text(name))
    size = {"-x": 64, "-xxx": 256, "-xxxx": 4096}[flag]
    ours = format_dump([DumpEntry(entry.header, entry.address, entry.data[:size])])
    real = subprocess.run(
        [LSPCI, "-F", str(DATA_DIR / f"{name}.txt"), flag],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert real == ours


@needs_lspci
@pytest.mark.lspci
@pytest.mark.parametrize("name", ["rootport_intel_haswell_e_aer", "bridge_ibm_eadsx_pcix"])
def test_verbose_lspci_output_round_trips_and_keeps_details(name: str) -> None:
    assert LSPCI is not None
    text = subprocess.run(
        [LSPCI, "-F", str(DATA_DIR / f"{name}.txt"), "-vvvxxxx"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (entry,) = parse_dump(text)
    assert format_dump([entry]) == text
    assert entry.details and all(line.startswith("\t") for line in entry.details)
    (plain,) = parse_dump(dump_text(name))
    assert entry.data == plain.data


@needs_lspci
@pytest.mark.lspci
def test_written_dump_is_decoded_by_real_lspci(tmp_path: Path) -> None:
    data = bytearray(256)
    data[0:4] = bytes.fromhex("3412e811")  # 1234:11e8, the QEMU edu device
    data[8:12] = bytes.fromhex("1000ff00")  # rev 0x10, class 00ff00
    entry = DumpEntry.for_device(PciAddress(0, 0, 3, 0), "Unclassified device", bytes(data))
    path = tmp_path / "edu.txt"
    path.write_text(format_dump([entry]))
    assert LSPCI is not None
    out = subprocess.run(
        [LSPCI, "-F", str(path), "-n"], check=True, capture_output=True, text=True
    ).stdout
    assert re.match(r"^00:03\.0 00ff: 1234:11e8 \(rev 10\)$", out.strip()), out


def test_entry_with_an_impossible_header_address() -> None:
    with pytest.raises(DumpFormatError, match="out of range"):
        DumpEntry("00:24.0 x", PciAddress(0, 0, 3, 0), bytes(64))


def test_cardbus_128_byte_dump_round_trips_and_pads() -> None:
    """``lspci -x`` prints 128 bytes for a CardBus bridge (header type 2)."""
    data = bytearray(128)
    data[0:4] = bytes.fromhex("4c1051ac")
    data[0x0E] = 0x82  # multi-function CardBus bridge
    lines = ["02:01.0 CardBus bridge: Texas Instruments PCI1420 PC card Cardbus Controller"]
    lines += [
        f"{i:02x}: " + " ".join(f"{b:02x}" for b in data[i : i + 16]) for i in range(0, 128, 16)
    ]
    text = "\n".join(lines) + "\n\n"
    (entry,) = parse_dump(text)
    assert format_dump([entry]) == text
    space = entry.config_space()
    assert space.size == 256 and bytes(space)[:128] == bytes(data)
