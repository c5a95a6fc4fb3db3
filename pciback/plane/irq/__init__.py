"""The IRQ router: device interrupts go to the session of the guest that owns the device.

Three pieces:

- :class:`DeviceInterrupts`, one per served device: the device model's
  interrupt sink (``assert_intx``/``deassert_intx``/``signal_msi``/
  ``signal_msix``) and the binding to the receiving session. The state the
  guest controls (mode, vectors, masks, pending bits, the INTx in-service
  latch) is the device's one :class:`~pciback.devices.InterruptState`, which
  it changes only through that object's operations.
- :class:`InterruptOutbox`, one per guest session: the delivery queue. It
  coalesces per ``(device, vector)`` while an event is not yet delivered, and
  spends one token of the guest's :class:`TokenBucket` per delivery, so a
  device storm becomes a bounded event rate with growing counts instead of a
  flood (XSA-332). Vectors bound to eventfds are signalled by writing the
  eventfd (the kernel counter coalesces); the rest go out as in-band
  :class:`~shared.protocol.InterruptEvent` messages.
- :class:`IrqRouter`, one per backend: the guest operations (enable, disable,
  EOI, mask) with the XSA-157 sanity rules, per-guest rate limits for
  deliveries and for guest-triggered warnings, and the ownership check on
  every delivery (XSA-237/302: a device that left the guest never interrupts
  it again).

Everything on the device side is synchronous and never blocks: the sink is
called from register handlers under the device lock.
"""

from pciback.plane.irq._delivery import (
    InterruptLimits,
    InterruptOutbox,
    OutboxStatistics,
    TokenBucket,
)
from pciback.plane.irq._router import (
    MODE_NAMES,
    DeviceInterrupts,
    InterruptError,
    InterruptStatistics,
    IrqRouter,
    RouterStatistics,
)

__all__ = [
    "MODE_NAMES",
    "InterruptLimits",
    "TokenBucket",
    "InterruptError",
    "InterruptOutbox",
    "OutboxStatistics",
    "DeviceInterrupts",
    "InterruptStatistics",
    "IrqRouter",
    "RouterStatistics",
]
