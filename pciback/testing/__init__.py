"""Testing kit: start an in-process backend and connect a frontend over any transport.

Use the pytest fixtures (installed as the ``pcisplit`` pytest plugin) or the
async helpers directly::

    async with running_backend(config, transports=("unix",), tmp=tmp_path) as rb:
        async with pcifront.connect(rb.address("unix"), guest="guest0") as bus:
            ...

``FakeHost`` is a fake sysfs PCI tree for ``kind = "host"`` devices (``sysfs_root``).
"""

from pciback.testing._fakehost import FakeHost
from pciback.testing._kit import TEST_TOKEN, RunningBackend, listen_address, running_backend

__all__ = ["TEST_TOKEN", "FakeHost", "RunningBackend", "running_backend", "listen_address"]
