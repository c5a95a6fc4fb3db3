"""A real Linux guest in QEMU drives a vfio-user device that nobody here wrote.

libvfio-user's C sample ``gpio-pci-idio-16`` (built by ``make peers`` from the pinned source)
serves a GPIO card: vendor 0x494f, device 0x0dc8, BAR2 = 256 bytes of I/O ports; a write to
offset 0 adds one to the count of every pin whose bit is set, a read of offset 1 has bit i
set when pin i's count is a multiple of 3. One guest boots for this module (QEMU's
``vfio-user-pci`` on the sample's socket, TCG) and runs :data:`SCRIPT`; the tests check
what it printed. This proves the VM infrastructure (``vm/``) end to end; when QEMU or the
image cannot be had, the fixture fails saying why (``make vm-image``), never skips.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from vm.guest import GuestResult, run_script_sync
from vm.servers import gpio_sample

pytestmark = pytest.mark.slow

#: Runs in the guest (busybox sh). Finds the device by its ids, shows what the guest kernel
#: made of it, then drives BAR2 through ``resource2`` (the kernel's sysfs file for an I/O
#: BAR: each read or write is one port access of that size).
SCRIPT = r"""
set -e
dev=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x494f ] && [ "$(cat "$d/device")" = 0x0dc8 ]; then dev=$d; fi
done
if [ -z "$dev" ]; then
    echo "no 494f:0dc8 device; the bus has:"
    for d in /sys/bus/pci/devices/*; do echo "  $d $(cat "$d/vendor") $(cat "$d/device")"; done
    exit 1
fi
echo "address=${dev##*/}"
echo "vendor=$(cat "$dev/vendor") device=$(cat "$dev/device") class=$(cat "$dev/class")"
sed -n 3p "$dev/resource" | sed 's/^/bar2=/'
read_in() {   # the input register at offset 1, as two hex digits
    dd if="$dev/resource2" bs=1 skip=1 count=1 2>/dev/null | hexdump -v -e '1/1 "%02x"'
}
write_out() {  # one byte to the output register at offset 0
    printf "\\$(printf %03o "$1")" |
        dd of="$dev/resource2" bs=1 seek=0 count=1 conv=notrunc 2>/dev/null
}
echo "in0=$(read_in)"
write_out 1
echo "in1=$(read_in)"
write_out 1
write_out 1
echo "in3=$(read_in)"
write_out 3
echo "in4=$(read_in)"
echo "--- lspci"
lspci -vvv -nn -s "${dev##*/}"
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestResult]:
    """One boot of the guest against a fresh sample server (its pin counts start at 0)."""
    socket_path = Path(tmp_path_factory.mktemp("gpio")) / "gpio.sock"
    with gpio_sample(socket_path):
        result = run_script_sync(SCRIPT, sockets=[socket_path], timeout=180)
    yield result


def _fields(result: GuestResult) -> dict[str, str]:
    assert result.status == 0, f"the guest's script failed:\n{result.output}\n{result.console}"
    return dict(re.findall(r"(\w+)=(\S+)", result.output.split("--- lspci")[0]))


def test_the_device_enumerates_with_the_servers_ids(guest: GuestResult) -> None:
    fields = _fields(guest)
    assert (fields["vendor"], fields["device"]) == ("0x494f", "0x0dc8")
    assert fields["address"].startswith("0000:")


def test_the_guest_kernel_assigned_an_io_bar2(guest: GuestResult) -> None:
    start, end, flags = (int(word, 16) for word in
                         re.search(r"bar2=(\S+) (\S+) (\S+)", guest.output).groups())  # type: ignore[union-attr]
    assert flags & 0x100, f"BAR2 is not an I/O BAR: flags {flags:#x}"  # IORESOURCE_IO
    assert start != 0 and end - start + 1 == 0x100


def test_port_writes_and_reads_reach_the_server(guest: GuestResult) -> None:
    fields = _fields(guest)
    # Every count starts at 0 (a multiple of 3): all bits set. One write of bit 0 makes pin 0
    # count 1; two more make it 3 again; then bits 0 and 1 make pin 0 count 4, pin 1 count 1.
    assert [fields[k] for k in ("in0", "in1", "in3", "in4")] == ["ff", "fe", "ff", "fc"]


def test_the_guests_own_lspci_sees_the_device(guest: GuestResult) -> None:
    lspci = guest.output.split("--- lspci\n", 1)[1]
    assert "[494f:0dc8]" in lspci
    assert re.search(r"Region 2: I/O ports at [0-9a-f]+ \[size=256\]", lspci), lspci
