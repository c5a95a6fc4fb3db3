"""pcifront's tools: presenting the guest's bus the way PCI tools expect.

The ``pcifront`` command's sub-commands and their helpers: ``lspci``
(:mod:`.lspci`, names from :mod:`.pciids`, the real pciutils through
:mod:`.pciutils`), ``setpci`` (:mod:`.setpci`), the sysfs mirror (:mod:`.sysfs`,
mounted by :mod:`.mount` and :mod:`.mount_cli`), legacy CF8/CFC and ECAM
access (:mod:`.legacy`) and the long-running ``agent`` (:mod:`.agent`).

Layer rule: the tools use the public client API (``pcifront.client``) and the
core's data types; nothing in the core or the clients imports them. A new
presentation of the bus (another tool, another file format) goes here.
"""
