"""The backend configuration: the schema of the TOML file and its parsing.

This package is a foundation of the backend: the device plane, the guest
side and operations all read a :class:`BackendConfig`, so it imports none of
them (only the device models, the policy and ``shared``). The whole file is
parsed in :mod:`._schema`.
"""

from pciback.config._schema import (
    DEFAULT_CONFIG_TEXT,
    BackendConfig,
    DeviceConfig,
    GuestConfig,
    HidePattern,
    TlsConfig,
    check_listen,
    default_config,
    default_control_path,
    load_config,
    parse_config,
)

__all__ = [
    "BackendConfig",
    "GuestConfig",
    "DeviceConfig",
    "TlsConfig",
    "HidePattern",
    "check_listen",
    "default_control_path",
    "load_config",
    "parse_config",
    "default_config",
    "DEFAULT_CONFIG_TEXT",
]
