#!/bin/busybox sh
# /init of pcisplit's test guest (vm/image.py puts it in .vm/boot/initramfs.gz).
#
# The kernel command line chooses what happens after the basic mounts:
#   pcisplit.mode=script       run /pcisplit/script (vm/guest.py appends it to the initramfs):
#                              its stdout goes to the second serial port (ttyS1), its stderr to
#                              the console (ttyS0), then its exit status, in decimal, to the
#                              third port (ttyS2); then the guest powers off.
#   pcisplit.mode=interactive  a shell on the console; the guest powers off when it exits.
#   pcisplit.boots=N           how many boots the script may take (default 1): the script sees
#                              PCISPLIT_BOOT (1, 2, ...) and may reset the machine with
#                              `reboot -f` to run again; the count lives in a CMOS RAM byte,
#                              which a machine reset keeps. A boot past N reports status 125.
# Nothing else: no network, no disks, no services.

/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

mode=script
boots=1
for word in $(cat /proc/cmdline); do
    case "$word" in
        pcisplit.mode=*) mode="${word#pcisplit.mode=}" ;;
        pcisplit.boots=*) boots="${word#pcisplit.boots=}" ;;
    esac
done

# CMOS RAM (index port 0x70 = 112, data port 0x71 = 113) through /dev/port, one byte.
byte() { printf "\\$(printf %03o "$1")"; }
cmos_read() {
    byte "$1" | dd of=/dev/port bs=1 seek=112 count=1 conv=notrunc 2>/dev/null
    dd if=/dev/port bs=1 skip=113 count=1 2>/dev/null | hexdump -v -e '1/1 "%u"'
}
cmos_write() {
    byte "$1" | dd of=/dev/port bs=1 seek=112 count=1 conv=notrunc 2>/dev/null
    byte "$2" | dd of=/dev/port bs=1 seek=113 count=1 conv=notrunc 2>/dev/null
}
CMOS_BOOT=126  # 0x7e: no firmware or QEMU field

if [ "$mode" = interactive ]; then
    echo "pcisplit guest: $(uname -r), busybox; lspci and setpci are pciutils'."
    echo "PCI devices are in /sys/bus/pci/devices; 'modprobe uio_pci_generic' binds a device"
    echo "to userspace. Leave with 'exit' or Ctrl-D (the guest powers off); Ctrl-A X stops QEMU."
    setsid cttyhack sh -l
    poweroff -f
fi

if [ ! -f /pcisplit/script ]; then
    echo "pcisplit guest: no /pcisplit/script in the initramfs" >&2
    echo 127 > /dev/ttyS2
    poweroff -f
fi

previous=$(cmos_read $CMOS_BOOT)
export PCISPLIT_BOOT=$(( ${previous:-0} + 1 ))
cmos_write $CMOS_BOOT "$PCISPLIT_BOOT"
if [ "$PCISPLIT_BOOT" -gt "$boots" ]; then
    echo "pcisplit guest: boot $PCISPLIT_BOOT, but the script may take only $boots" >&2
    echo 125 > /dev/ttyS2
    poweroff -f
fi

# Raw ports: the host reads the script's bytes exactly as written (no CR inserted before LF).
stty -F /dev/ttyS1 raw -echo 2>/dev/null
stty -F /dev/ttyS2 raw -echo 2>/dev/null
cd /tmp
sh /pcisplit/script > /dev/ttyS1 2> /dev/console < /dev/null
echo "$?" > /dev/ttyS2
poweroff -f
