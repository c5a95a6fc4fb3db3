"""Policy configuration: validation messages, presets by name, quirks with enforced masks."""

from __future__ import annotations

import logging

import pytest
from _policy_support import MSI, PCIE, VNDR, synthetic_device

from pciback.policy import (
    AccessDeniedError,
    PolicedDevice,
    PolicyConfig,
    Preset,
    QuirkConfig,
    known_register_names,
)
from shared.errors import ConfigFileError


def test_from_mapping_reads_every_key_and_ignores_the_loaders_keys() -> None:
    config = PolicyConfig.from_mapping(
        {
            "kind": "snapshot",
            "dump": "x.txt",
            "policy": "permissive",
            "allow": ["command.intx_disable", "pcie.devctl"],
            "deny": ["command.bus_master"],
            "hide_capabilities": ["msix", "aer", "vndr@0xd0"],
            "quirks": [{"offset": 0xE0, "size": 4, "mask": 0xFF00}],
        },
        where="device[2]",
    )
    assert config.preset is Preset.PERMISSIVE
    assert config.allow == ("command.intx_disable", "pcie.devctl")
    assert config.deny == ("command.bus_master",)
    assert config.hide == ("msix", "aer", "vndr@0xd0")
    assert config.quirks == (QuirkConfig(0xFF00, None, None, 0xE0, 4, "", "device[2].quirks[0]"),)
    assert config.where == "device[2]"
    assert PolicyConfig.from_mapping({}, where="device[0]") == PolicyConfig(where="device[0]")


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        (
            {"allow": ["comand.bus_master"]},
            "device[2].allow[0]: unknown register 'comand.bus_master'; did you mean "
            "'command.bus_master'",
        ),
        ({"deny": ["command", "pcie.devctrl"]}, "device[2].deny[1]: unknown register"),
        ({"allow": "command"}, "device[2].allow: expected a list of strings"),
        ({"allow": [""]}, "device[2].allow[0]: expected a non-empty string"),
        ({"policy": "strict"}, "device[2].policy: unknown preset 'strict'; known: default"),
        ({"allow": ["bar0"], "deny": ["bar0"]}, "device[2].deny[0]: 'bar0' is also in allow"),
        (
            {"hide_capabilities": ["msi-x"]},
            "device[2].hide_capabilities[0]: unknown capability 'msi-x'",
        ),
        ({"quirks": [{"mask": 1}]}, "device[2].quirks[0]: give register"),
        ({"quirks": [{"offset": 0xE1, "size": 2, "mask": 1}]}, "quirks[0].offset: 0xe1 is not"),
        ({"quirks": [{"offset": 0xE0, "size": 3, "mask": 1}]}, "quirks[0].size: must be 1, 2"),
        ({"quirks": [{"offset": 0xE0, "size": 1, "mask": 0x100}]}, "quirks[0].mask: expected"),
        ({"quirks": [{"offset": 0x10, "size": 4, "mask": 1}]}, "quirks[0].offset: expected"),
        ({"quirks": [{"register": "pcie.devctl", "offset": 8, "mask": 1}]}, "not both"),
        ({"quirks": [{"register": "pcie.devctl", "mask": 1, "colour": 1}]}, "colour: unknown"),
    ],
)
def test_from_mapping_errors_name_the_key(mapping: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigFileError) as info:
        PolicyConfig.from_mapping(mapping, where="device[2]")
    assert message in str(info.value)


def test_global_quirk_needs_a_match() -> None:
    with pytest.raises(ConfigFileError, match=r"quirk\[0\]\.match: missing"):
        QuirkConfig.from_mapping({"offset": 0xE0, "size": 4, "mask": 1}, where="quirk[0]")
    with pytest.raises(ConfigFileError, match=r"quirk\[1\]\.match: expected 'vvvv:dddd'"):
        QuirkConfig.from_mapping({"match": "8086-10c9", "mask": 1}, where="quirk[1]")
    quirk = QuirkConfig.from_mapping(
        {"match": "8086:10C9", "register": "pcie.devctl", "mask": 0x10}, where="quirk[0]"
    )
    assert quirk.match == (0x8086, 0x10C9)
    assert quirk.matches(0x8086, 0x10C9) and not quirk.matches(0x8086, 0x10C8)


def test_known_names_include_header_and_capability_rules() -> None:
    names = known_register_names()
    for name in [
        "command.bus_master",
        "bar0",
        "pcie.devctl",
        "msi.data",
        "aer.header",
        "sriov.body",
    ]:
        assert name in names


def test_allowing_a_protected_register_fails_at_bind_time_naming_the_key() -> None:
    config = PolicyConfig.from_mapping({"allow": ["bar1", "vendor_id"]}, where="device[4]")
    with pytest.raises(ConfigFileError, match=r"device\[4\]\.allow\[1\]: 'vendor_id' is read-only"):
        PolicedDevice(synthetic_device(), config, guest="g", device="d")


def test_names_the_device_lacks_are_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    config = PolicyConfig(allow=("pcie.devctl",), hide=("sata",), where="device[1]")
    caplog.set_level(logging.WARNING, logger="pcisplit.policy")
    dev = PolicedDevice(synthetic_device(), config, guest="g", device="d")
    assert dev.compiled.unmatched == ("sata",)
    assert "device[1]: policy entry 'sata' matches nothing" in caplog.text


# ------------------------------------------------------------------------------- quirks
def _quirk(mapping: dict[str, object]) -> QuirkConfig:
    return QuirkConfig.from_mapping(mapping, where="quirk[0]")


def test_quirk_mask_is_enforced_on_an_unlisted_register() -> None:
    provider = synthetic_device()  # 0xE0 holds 0xdeadbeef
    quirk = _quirk({"match": "8086:10c9", "offset": 0xE0, "size": 4, "mask": 0x0000_FF00})
    dev = PolicedDevice(provider, guest="g", device="d", quirks=[quirk])
    dev.config_write(0xE0, 4, 0xDEAD_12EF)  # only the masked byte changes
    assert provider.writes == [(0xE1, 1, 0x12)]  # and only that byte is written
    with pytest.raises(AccessDeniedError) as info:
        dev.config_write(0xE0, 4, 0x0000_0000)  # would change bits outside the mask
    assert info.value.rule == "quirk.0xe0.masked"
    assert provider.writes == [(0xE1, 1, 0x12)]
    assert provider.config_read(0xE0, 4) == 0xDEAD_12EF


def test_quirk_applies_only_to_its_vendor_and_device() -> None:
    quirk = _quirk({"match": "8086:10c8", "offset": 0xE0, "size": 4, "mask": 0xFF})
    dev = PolicedDevice(synthetic_device(), guest="g", device="d", quirks=[quirk])
    with pytest.raises(AccessDeniedError):
        dev.config_write(0xE0, 4, 0xDEAD_BE00)
    assert dev.compiled.quirks == ()


def test_quirk_on_a_named_register_carves_its_mask() -> None:
    provider = synthetic_device()
    quirk = _quirk({"match": "8086:10c9", "register": "pcie.devctl", "mask": 0x0010})
    dev = PolicedDevice(provider, guest="g", device="d", quirks=[quirk])
    dev.config_write(PCIE + 8, 2, 0x5800)  # relaxed ordering off; MRRS changes virtually
    assert provider.writes == [(PCIE + 8, 1, 0x00)]
    assert provider.config_read(PCIE + 8, 2) == 0x2800
    assert dev.config_read(PCIE + 8, 2) == 0x5800
    with pytest.raises(AccessDeniedError):
        dev.config_write(PCIE + 8, 2, 0xD800)  # FLR stays refused


def test_quirk_inside_a_capability_body() -> None:
    provider = synthetic_device()
    quirk = QuirkConfig.from_mapping(
        {"offset": VNDR + 4, "size": 2, "mask": 0x00FF},
        where="device[0].quirks[0]",
        require_match=False,
    )
    dev = PolicedDevice(provider, PolicyConfig(quirks=(quirk,)), guest="g", device="d")
    dev.config_write(VNDR + 4, 2, 0x0042)
    assert provider.writes == [(VNDR + 4, 1, 0x42)]
    with pytest.raises(AccessDeniedError):
        dev.config_write(VNDR + 6, 2, 0x1)  # rest of the body: still read-only


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        (
            {"offset": MSI + 0xC, "size": 2, "mask": 0xFFFF},
            "belong to 'msi.data', which is protected",
        ),
        ({"offset": 0x04, "size": 2, "mask": 0x0100}, "offset: expected an integer from 0x40"),
        ({"register": "command", "mask": 0x0100}, "belong to 'command.other', which is protected"),
        ({"register": "pcie.devctl", "mask": 0x8000}, "'pcie.devctl.flr', which is protected"),
        ({"offset": PCIE + 0x10, "size": 4, "mask": 1}, "span registers"),
    ],
)
def test_quirks_never_cover_protected_bits(mapping: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigFileError) as info:
        quirk = QuirkConfig.from_mapping({"match": "8086:10c9", **mapping}, where="quirk[3]")
        PolicedDevice(synthetic_device(), guest="g", device="d", quirks=[quirk])
    assert message in str(info.value)
    assert "quirk[3]" in str(info.value)
