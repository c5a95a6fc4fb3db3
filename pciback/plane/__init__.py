"""The device plane: the devices the backend serves, whoever asks.

The registry of served devices and their assignment to guests
(:mod:`.registry`), the guest's protected view of one device (:mod:`.access`),
firmware-like set-up of BARs and interrupt lines (:mod:`.firmware`), each
device's running context (:mod:`.runtime`), DMA windows (:mod:`.dma`),
interrupt routing (:mod:`.irq`), hot-plug with acknowledgement
(:mod:`.hotplug`) and the saved config of writable host devices
(:mod:`.hoststate`). The device models (``pciback.devices``) and the
config-space policy (``pciback.policy``) sit below it.

Layer rule: nothing here imports the guest side (``pciback.guests``),
operations (``pciback.ops``) or the service. Front doors reach guests'
sessions only through the small interfaces defined here (for example
:class:`.hotplug.ChangeSink`).
"""
