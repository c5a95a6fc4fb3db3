"""An interrupt sink that records what a device model told it (device model tests)."""

from __future__ import annotations

__all__ = ["RecordingSink"]


class RecordingSink:
    """An ``InterruptSink`` (``pciback.devices``) that records every call, in order.

    ``events`` holds ``("assert", 0)``, ``("deassert", 0)``, ``("msi", vector)`` and
    ``("msix", vector)`` tuples.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def assert_intx(self) -> None:
        self.events.append(("assert", 0))

    def deassert_intx(self) -> None:
        self.events.append(("deassert", 0))

    def signal_msi(self, vector: int) -> None:
        self.events.append(("msi", vector))

    def signal_msix(self, vector: int) -> None:
        self.events.append(("msix", vector))
