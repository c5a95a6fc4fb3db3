"""Guest-side scripts (busybox sh, run by ``vm.guest.run_script``) that drive an edu device and
describe a guest's PCI bus from inside an unmodified Linux guest.

Each prints ``key=value`` lines (:func:`fields` reads them). They find their device by its
ids, so they work against any vfio-user server that offers one: pciback's own vfio-user
front door (``pciback serve`` with ``vfio_user = "SOCKET"`` on a device), or any other
implementation of QEMU's edu specification.

- :data:`EDU` reads the ids, class and BAR0 the guest kernel assigned, then drives BAR0
  with the guest's own memory accesses (``devmem``: physical loads and stores): the
  identification register, liveness (reads back the inversion), the factorial (polling and
  with its interrupt), an interrupt raised on request (``uio_pci_generic`` binds; the guest
  kernel counts it in ``/proc/interrupts``; the script waits for it on ``/dev/uioN``), and
  DMA both ways between the device's buffer and guest RAM reserved with ``memmap=``
  (:data:`EDU_CMDLINE`: give it to ``run_script(cmdline=...)``).
- :data:`EDU_RESET` runs twice (``run_script(boots=2)``): the first boot leaves state in the
  device (liveness value, interrupt status, DMA buffer) and resets the machine; the second
  reads what a reset device holds.
- :data:`BUS` prints every device's sysfs ids and the guest's ``lspci -vvv -nn``, for
  comparing with what ``pcifront lspci -vvv`` shows for the same devices.
"""

from __future__ import annotations

import re

__all__ = ["EDU", "EDU_RESET", "EDU_CMDLINE", "DMA_BUFFER", "BUS", "fields"]

#: Guest RAM the kernel leaves alone (``memmap=SIZE$START``: reserved in the e820 map), so the
#: script may DMA to it and read it with devmem. Below 256 MiB: edu's DMA mask is 28 bits.
DMA_BUFFER = 0x0800_0000
EDU_CMDLINE = f"quiet memmap=64K${DMA_BUFFER:#x}"

_FIND = r"""
find_dev() {  # the sysfs directory of the first device with vendor $1 and device $2
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = "$1" ] && [ "$(cat "$d/device")" = "$2" ]; then
            echo "$d"; return 0
        fi
    done
    return 1
}
dev=$(find_dev 0x1234 0x11e8) || {
    echo "error=no-edu"
    for d in /sys/bus/pci/devices/*; do
        echo "  ${d##*/} $(cat "$d/vendor") $(cat "$d/device")"
    done
    exit 1
}
addr=${dev##*/}
bar0=$(sed -n 1p "$dev/resource" | cut -d' ' -f1)
r() { devmem "$(printf 0x%x $((bar0 + $1)))" 32; }
w() { devmem "$(printf 0x%x $((bar0 + $1)))" 32 "$2"; }
until_clear() {  # poll register $1 until bit $2 is clear (at most 10000 reads)
    n=0
    while [ $(( $(r "$1") & $2 )) -ne 0 ]; do
        n=$((n + 1)); [ $n -lt 10000 ] || { echo "error=stuck-$1"; exit 1; }
    done
}
# Memory decode and bus mastering (DMA) on; nothing else changed.
setpci -s "$addr" COMMAND=0x0006:0x0006
"""

EDU = _FIND + rf"""
echo "address=$addr"
echo "vendor=$(cat "$dev/vendor") device=$(cat "$dev/device") class=$(cat "$dev/class")"
echo "revision=$(cat "$dev/revision")"
set -- $(sed -n 1p "$dev/resource")
echo "bar0_start=$1 bar0_end=$2 bar0_flags=$3"
echo "ident=$(r 0x00)"
w 0x04 0x12345678
echo "liveness=$(r 0x04)"
w 0x08 10
until_clear 0x20 0x01
echo "factorial=$(r 0x08)"

# DMA: guest RAM -> the device's buffer (0x40000), then the buffer -> guest RAM elsewhere.
buf={DMA_BUFFER:#x}
devmem $buf 32 0x11223344
devmem $((buf + 4)) 32 0x55667788
devmem $((buf + 0x100)) 32 0
devmem $((buf + 0x104)) 32 0
w 0x80 $buf; w 0x88 0x40000; w 0x90 8; w 0x98 0x1
until_clear 0x98 0x01
w 0x80 0x40000; w 0x88 $((buf + 0x100)); w 0x90 8; w 0x98 0x3
until_clear 0x98 0x01
echo "dma_back=$(devmem $((buf + 0x100)) 32),$(devmem $((buf + 0x104)) 32)"

# Interrupts: uio_pci_generic takes the device (INTx; its handler masks the line with the
# Interrupt Disable bit of COMMAND, which userspace clears again); a read of /dev/uioN
# returns once an interrupt came after the file was opened.
modprobe uio_pci_generic
echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id
uio=$(ls "$dev/uio")
irq=$(cat "$dev/irq")
echo "driver=$(basename "$(readlink "$dev/driver")") uio=$uio irq=$irq"
count() {{ awk -v irq="$irq:" '$1 == irq {{ print $2 }}' /proc/interrupts; }}
echo "irq_count0=$(count)"
wait_irq() {{  # run "$@"; return once an interrupt came after it began
    exec 3< "/dev/$uio"                          # an open notes the interrupt count
    setpci -s "$addr" COMMAND=0x0000:0x0400      # unmask: clear Interrupt Disable
    "$@"
    timeout 20 dd bs=4 count=1 of=/tmp/event <&3 2>/dev/null ||
        {{ echo "error=no-interrupt"; exit 1; }}
    exec 3<&-
}}
wait_irq w 0x60 0x00000004
echo "irq_status1=$(r 0x24)"
w 0x64 0x00000004
echo "irq_status1_acked=$(r 0x24)"
echo "irq_count1=$(count)"
start_factorial() {{ w 0x20 0x80; w 0x08 5; }}
wait_irq start_factorial
until_clear 0x20 0x01
echo "irq_status2=$(r 0x24) factorial_irq=$(r 0x08)"
w 0x64 0x00000001
echo "irq_count2=$(count)"

"""

EDU_RESET = _FIND + r"""
if [ "$PCISPLIT_BOOT" = 1 ]; then
    w 0x04 0x0000ffff
    w 0x60 0x00000010
    echo "before_reset_liveness=$(r 0x04) before_reset_irq_status=$(r 0x24)"
    sync
    reboot -f
fi
echo "after_reset_liveness=$(r 0x04) after_reset_irq_status=$(r 0x24)"
"""

BUS = r"""
for d in /sys/bus/pci/devices/*; do
    line="device ${d##*/}"
    for f in vendor device class revision subsystem_vendor subsystem_device; do
        line="$line $f=$(cat "$d/$f")"
    done
    echo "$line"
done
echo "--- lspci"
lspci -vvv -nn
"""


def fields(output: str) -> dict[str, str]:
    """The ``key=value`` pairs a script printed (later ones win)."""
    return dict(re.findall(r"(\w+)=(\S+)", output))
