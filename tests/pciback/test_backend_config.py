"""The TOML config: the embedded default, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pciback.config import default_config, load_config, parse_config
from shared.errors import ConfigFileError
from shared.pci import PciAddress


def test_embedded_default_is_one_edu_for_guest0() -> None:
    cfg = default_config()
    assert cfg.listen == ("unix:./pciback.sock",)
    assert list(cfg.guests) == ["guest0"]
    (dev,) = cfg.devices
    assert (dev.id, dev.kind, dev.model, dev.guest) == ("edu0", "emulated", "edu", "guest0")


def test_full_schema(tmp_path: Path) -> None:
    text = """
listen = ["unix:/tmp/x.sock", "tcp://127.0.0.1:7070"]
[limits]
max_message_size = 131072
max_in_flight = 32
[[guest]]
name = "g1"
allow_plain_tcp = true
[[guest]]
name = "g2"
[[device]]
id = "e"
model = "edu"
guest = "g1"
[[device]]
id = "snap"
kind = "snapshot"
dump = "nic.txt"
bar_sizes = { 0 = 0x20000, 3 = 0x4000 }
[[device]]
id = "h"
kind = "host"
address = "00:03.0"
"""
    path = tmp_path / "b.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.limits.max_message_size == 131072 and cfg.limits.max_in_flight == 32
    assert cfg.guests["g1"].allow_plain_tcp and not cfg.guests["g2"].allow_plain_tcp
    edu, snap, host = cfg.devices
    assert edu.kind == "emulated" and edu.guest == "g1"
    assert snap.dump == tmp_path / "nic.txt"  # relative to the config file
    assert snap.bar_sizes == {0: 0x20000, 3: 0x4000}
    assert host.address == PciAddress(0, 0, 3, 0) and host.writable is False


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("listen = 5", "listen: expected a list"),
        ("listen = [1]", "listen[0]"),
        ("bogus = 1", "unknown key 'bogus'"),
        ("[[guest]]\nnam = 'x'", "guest[0]: unknown key 'nam'"),
        ("[[guest]]\nname = 'a b'", "guest[0].name"),
        ("[[guest]]\nname = 'a'\n[[guest]]\nname = 'a'", "declared twice"),
        ("[[device]]\nkind = 'emulated'\nmodel = 'edu'", "device[0]: missing key 'id'"),
        ("[[device]]\nid = 'x'\nkind = 'magic'", "device[0].kind: 'magic' is not one of"),
        ("[[device]]\nid = 'x'\nkind = 'emulated'", "needs key 'model'"),
        ("[[device]]\nid = 'x'\nkind = 'snapshot'", "needs key 'dump'"),
        ("[[device]]\nid = 'x'\nkind = 'host'", "needs key 'address'"),
        ("[[device]]\nid = 'x'\nkind = 'host'\naddress = 'zz'", "device[0].address"),
        ("[[device]]\nid = 'x'\nmodel = 'edu'\nguest = 'nobody'", "guest 'nobody' is not declared"),
        ("[[device]]\nid = 'x'\nmodel = 'edu'\n[[device]]\nid = 'x'\nmodel = 'edu'", "used twice"),
        ("[[device]]\nid='x'\nkind='snapshot'\ndump='d'\nbar_sizes={0=3}", "not a power of two"),
        ("[[device]]\nid='x'\nkind='snapshot'\ndump='d'\nbar_sizes={9=16}", "BAR index 0-5"),
        ("[[device]]\nid='x'\nkind='host'\naddress='00:03.0'\nwritable='yes'", "writable"),
        ("[limits]\nmax_in_flight = 0", "limits"),
        ("[tls]\ncert = 'c'", "tls: missing key 'key'"),
        ("listen = [", "not valid TOML"),
    ],
)
def test_invalid_configs_name_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigFileError) as info:
        parse_config(text)
    assert needle in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")
