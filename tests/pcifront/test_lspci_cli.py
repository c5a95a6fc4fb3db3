"""``pcifront lspci``: options through the system's pciutils, --json, and life without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pciback.testing import running_backend
from pcifront import cli
from pcifront.tools.pciutils import PciutilsMissingError

EDU = "[[guest]]\nname = 'guest0'\n[[device]]\nid = 'edu'\nkind = 'emulated'\nmodel = 'edu'\n" \
    "guest = 'guest0'\n"


async def _lspci(address: str, *flags: str) -> str:
    return await cli._lspci(cli.build_parser().parse_args(["lspci", "--connect", address, *flags]))


@pytest.mark.lspci
async def test_verbose_shows_the_assigned_region(tmp_path: Path) -> None:
    if cli.find_tool("lspci") is None:
        pytest.skip("pciutils (lspci) is not installed")
    async with running_backend(EDU, tmp=tmp_path) as rb:
        out = await _lspci(rb.address("memory"), "-vvv")
    assert "\tRegion 0: Memory at c0000000 (32-bit, non-prefetchable) [size=1M]\n" in out
    assert "\tInterrupt: pin A routed to IRQ 10\n" in out


async def test_json_lists_ids_irq_and_resources(tmp_path: Path) -> None:
    async with running_backend(EDU, tmp=tmp_path) as rb:
        data = json.loads(await _lspci(rb.address("memory"), "--json", "-n"))
    (edu,) = data
    assert (edu["slot"], edu["vendor_id"], edu["device_id"], edu["irq"]) == (
        "00:00.0", "1234", "11e8", 10,
    )
    assert edu["resources"] == [
        {"index": 0, "kind": "memory", "start": "0xc0000000", "size": 0x100000,
         "prefetchable": False, "64bit": False}
    ]


async def test_without_pciutils_decoding_options_say_so_and_basics_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "find_tool", lambda name: None)
    monkeypatch.setattr("pcifront.tools.pciutils.find_tool", lambda name: None)
    async with running_backend(EDU, tmp=tmp_path) as rb:
        with pytest.raises(PciutilsMissingError, match="not installed") as info:
            await _lspci(rb.address("memory"), "-vv")
        assert "\n" not in str(info.value)
        out = await _lspci(rb.address("memory"), "-n")
    assert out == "00:00.0 00ff: 1234:11e8 (rev 10)\n"
