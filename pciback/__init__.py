"""pciback: the backend service that owns PCI devices and serves them to guests."""

from pciback.config import BackendConfig, default_config, load_config, parse_config
from pciback.registry import MODELS, DeviceRegistry, register_model
from pciback.service import Backend

__all__ = [
    "Backend",
    "BackendConfig",
    "DeviceRegistry",
    "MODELS",
    "default_config",
    "load_config",
    "parse_config",
    "register_model",
]
