"""pciback: the backend service that owns PCI devices and serves them to guests."""

from pciback.config import BackendConfig, default_config, load_config, parse_config
from pciback.plane.registry import MODELS, DeviceRegistry, register_model
from pciback.service import Backend
from shared.cli import package_version

#: The installed pcisplit version (from the package metadata).
__version__ = package_version()

__all__ = [
    "__version__",
    "Backend",
    "BackendConfig",
    "DeviceRegistry",
    "MODELS",
    "default_config",
    "load_config",
    "parse_config",
    "register_model",
]
