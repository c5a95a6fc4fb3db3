"""The errors of the guest-VM tooling, in pcisplit's one hierarchy (``shared.errors``)."""

from __future__ import annotations

from shared.errors import PcisplitError

__all__ = ["VmError", "VmImageError", "GuestError", "GuestTimeout"]


class VmError(PcisplitError):
    """Something about the test VM (its image under ``.vm/`` or a guest boot) went wrong."""


class VmImageError(VmError):
    """The VM image cannot be built or is missing; the message names the step and the fix."""


class GuestError(VmError):
    """A guest did not boot or did not run its script to the end (QEMU failed, the kernel
    panicked, the script never reported its status). The message carries the console's tail."""


class GuestTimeout(GuestError):
    """A guest was still running when its time was up; QEMU has been killed."""
