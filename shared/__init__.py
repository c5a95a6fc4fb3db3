"""pcisplit's shared package: what both pciback and pcifront import.

Sub-packages: ``pci`` (pure PCI model), ``protocol`` (sans-I/O wire protocol),
``ring`` (shared-memory ring), ``evtchn`` (event channels), ``transport``
(frame transports). Nothing here knows which side it runs on.
"""
