"""A guest's script may reset the machine and run again (``run_script(boots=N)``).

The machine reset is QEMU's full system reset: the vfio-user device is reset and enumerated
again by the second boot. This is what tests of "resetting the VM resets the device" stand
on. One boot sequence for the module, against libvfio-user's gpio sample (which keeps its
pin counts across a reset: it registers no reset handler).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vm.guest import GuestResult, run_script_sync
from vm.servers import gpio_sample

pytestmark = pytest.mark.slow

SCRIPT = r"""
dev=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x494f:0x0dc8 ] && dev=$d
done
[ -n "$dev" ] || { echo "boot$PCISPLIT_BOOT=no-device"; exit 1; }
read_in() { dd if="$dev/resource2" bs=1 skip=1 count=1 2>/dev/null | hexdump -v -e '1/1 "%02x"'; }
if [ "$PCISPLIT_BOOT" = 1 ]; then
    printf '\001' | dd of="$dev/resource2" bs=1 count=1 conv=notrunc 2>/dev/null
    echo "boot1=$(read_in)"
    reboot -f
fi
echo "boot$PCISPLIT_BOOT=$(read_in)"
[ "$PCISPLIT_BOOT" = 2 ] && reboot -f
exit 7
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestResult]:
    socket_path = Path(tmp_path_factory.mktemp("gpio")) / "gpio.sock"
    with gpio_sample(socket_path):
        yield run_script_sync(SCRIPT, sockets=[socket_path], timeout=240, boots=2)


def test_the_script_runs_once_per_boot_and_the_device_is_there_each_time(
        guest: GuestResult) -> None:
    # Boot 1 counts pin 0 once and resets the machine; boot 2 finds the device again, with
    # the server's state (this server keeps it), and resets once more than it may.
    assert guest.output == "boot1=fe\nboot2=fe\n", guest.console


def test_a_boot_past_the_limit_is_reported_not_run(guest: GuestResult) -> None:
    assert guest.status == 125
    assert "boot 3, but the script may take only 2" in guest.console
