"""The backend configuration: the schema of the TOML file and its parsing.

This package is a foundation of the backend: the device plane, the guest
side and operations all read a :class:`BackendConfig`, so it imports none of
them (only the device models, the policy and ``shared``). The whole file is
parsed in :mod:`._schema`; the ``[[guest]]`` tables in :mod:`._guests` and
the ``[limits]`` table in :mod:`._limits`.
"""

from pciback.config._guests import (
    BUS_VIEWS,
    GUEST_KEYS,
    MIN_TOKEN_LEN,
    parse_guest,
    read_token_file,
    tls_listeners,
)
from pciback.config._limits import LIMIT_KEYS, ResourceLimits
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
    "ResourceLimits",
    "LIMIT_KEYS",
    "parse_guest",
    "read_token_file",
    "tls_listeners",
    "BUS_VIEWS",
    "GUEST_KEYS",
    "MIN_TOKEN_LEN",
]
