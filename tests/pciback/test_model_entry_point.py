"""Device models published through the ``pcisplit.models`` entry point are found by name.

An installed distribution is simulated the way importlib.metadata finds real ones:
a ``*.dist-info`` directory with ``entry_points.txt`` on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import pciback.plane.registry as registry
from pciback.config import parse_config
from pciback.plane.registry import MODEL_ENTRY_POINT_GROUP, build_provider
from shared.errors import ConfigFileError

CONFIG = '[[device]]\nid = "t"\nmodel = "{model}"\n'


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ticker_plugin.py").write_text(
        "from pciback.devices import EmulatedDevice\n"
        "class Ticker(EmulatedDevice):\n"
        "    def __init__(self):\n"
        "        super().__init__(vendor_id=0x1234, device_id=0xBEEF, class_code=0xFF0000)\n"
    )
    dist = tmp_path / "ticker_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ticker-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{MODEL_ENTRY_POINT_GROUP}]\nticker = ticker_plugin:Ticker\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # A fresh view of the registry: entry points are read once, on the first unknown name.
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    monkeypatch.setattr(registry, "_models_loaded", False)


@pytest.mark.usefixtures("plugin_on_path")
def test_a_model_from_an_entry_point_is_served_by_name() -> None:
    config = parse_config(CONFIG.format(model="ticker"))
    provider, _ = build_provider(config.devices[0])
    assert type(provider).__name__ == "Ticker"
    assert provider.config_read(0x00, 4) == 0xBEEF1234


@pytest.mark.usefixtures("plugin_on_path")
def test_a_misspelled_model_gets_the_closest_name_including_plugins() -> None:
    config = parse_config(CONFIG.format(model="tikcer"))
    expected = "unknown device model 'tikcer'; did you mean 'ticker'"
    with pytest.raises(ConfigFileError, match=expected):
        build_provider(config.devices[0])
