"""The per-guest config-space policy: what a guest may see and change of each register.

- :class:`PolicedDevice` wraps a :class:`~pciback.devices.DeviceProvider` for
  one guest and answers its config reads and writes;
- :class:`PolicyConfig` / :class:`QuirkConfig` are the validated configuration
  (presets, allow/deny lists, hidden capabilities, enforced quirk masks);
- :class:`AuditLog` records every denied write, rate-limited per (guest, device).

The register tables and the engine behind them live in ``shared.pci``
(:class:`~shared.pci.FieldTable`, :func:`~shared.pci.apply_write`). See
``docs/policy.md``.
"""

from pciback.policy._audit import AUDIT_LOGGER, AuditEntry, AuditLog, AuditStatistics
from pciback.policy._capregs import CAPABILITY_NAMES, ext_cap_name, std_cap_name
from pciback.policy._compile import CompiledPolicy, compile_policy
from pciback.policy._config import PolicyConfig, Preset, QuirkConfig, known_register_names
from pciback.policy._device import MsiState, MsixState, PolicedDevice
from pciback.policy._header import INTERRUPT_LINE_INIT
from shared.pci import AccessDeniedError

__all__ = [
    "PolicedDevice",
    "PolicyConfig",
    "QuirkConfig",
    "Preset",
    "AuditLog",
    "AuditEntry",
    "AuditStatistics",
    "AUDIT_LOGGER",
    "AccessDeniedError",
    "MsiState",
    "MsixState",
    "CompiledPolicy",
    "compile_policy",
    "known_register_names",
    "CAPABILITY_NAMES",
    "std_cap_name",
    "ext_cap_name",
    "INTERRUPT_LINE_INIT",
]
