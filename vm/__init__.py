"""pcisplit's test VM: an unmodified Debian Linux guest in QEMU >= 10.1 (``vfio-user-pci``).

``vm.image`` builds it under ``.vm/`` from Debian's packages (``make vm-image``);
``vm.guest`` boots it against vfio-user servers and runs a shell script inside
(the integration tests in ``tests/vm/``); ``python -m vm shell`` (``make vm``) boots it
interactively. ``docs/vfio-user.md`` has the user's side.
"""
