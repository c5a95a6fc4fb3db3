"""A device model of the user's own needs no launcher script: ``model = "module:Class"``
beside the config, or ``--plugin FILE``; the entry-point mechanism is unchanged
(``test_model_entry_point.py``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import pciback.plane.registry as registry
from pciback.cli import main

BIN = Path(sys.executable).parent
TIMEOUT = 30.0  # a stall guard for real processes
USAGE = 2

MODEL = """\
from pciback.devices import EmulatedDevice


class Ticker(EmulatedDevice):
    def __init__(self):
        super().__init__(vendor_id=0x1234, device_id=0xBEEF, class_code=0xFF0000, revision=1)
"""

CONFIG = """\
listen = ["unix:./ticker.sock"]
[[guest]]
name = "guest0"
[[device]]
id = "ticker0"
model = "{model}"
guest = "guest0"
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh module name (modules stay imported), its file beside the config."""
    name = f"ticker_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    yield name
    sys.modules.pop(name, None)


def _check(tmp_path: Path, model: str, *extra: str) -> int:
    config = tmp_path / "ticker.toml"
    config.write_text(CONFIG.format(model=model))
    return main(["check", "--config", str(config), *extra])


def test_check_finds_module_class_beside_the_config(
    tmp_path: Path, module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _check(tmp_path, f"{module}:Ticker") == 0
    assert "is valid: 1 guest(s), 1 device(s)" in capsys.readouterr().out
    assert str(tmp_path) not in sys.path  # looked there for this import only


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{m}:Tikcer", "device[0].model: '{m}' has no 'Tikcer'; did you mean 'Ticker'?"),
        ("{m}:EmulatedDevice.__init__", "is not a device model class"),
        ("nowhere_{m}:Ticker", "cannot import module 'nowhere_{m}'"),
        ("{m}:", "is not of the form \"module:Class\""),
    ],
)
def test_a_bad_module_class_is_one_line_naming_the_key(
    tmp_path: Path, module: str, capsys: pytest.CaptureFixture[str], model: str, message: str
) -> None:
    assert _check(tmp_path, model.format(m=module)) == USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(m=module) in err, err


def test_a_model_module_that_fails_to_import_is_named(
    tmp_path: Path, module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / f"{module}.py").write_text("raise RuntimeError('no hardware here')\n")
    assert _check(tmp_path, f"{module}:Ticker") == USAGE
    err = capsys.readouterr().err
    assert f"importing {module!r} failed: RuntimeError: no hardware here" in err


def test_an_unknown_model_name_says_how_to_bring_your_own(
    tmp_path: Path, module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _check(tmp_path, "ticker") == USAGE
    err = capsys.readouterr().err
    assert "unknown device model 'ticker'" in err
    assert 'model = "module:Class"' in err and "--plugin FILE" in err


def test_a_plugin_file_registers_a_model_by_name(
    tmp_path: Path, module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = tmp_path / f"reg_{module}.py"
    plugin.write_text(
        f"from pciback import register_model\nfrom {module} import Ticker\n"
        f"register_model('{module}', Ticker)\n"
    )
    try:
        assert _check(tmp_path, module, "--plugin", str(plugin)) == 0
    finally:
        sys.modules.pop(plugin.stem, None)
    assert "is valid" in capsys.readouterr().out
    assert str(tmp_path) not in sys.path  # the plugin's directory, while it ran


def test_a_missing_plugin_file_is_a_usage_error(
    tmp_path: Path, module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _check(tmp_path, f"{module}:Ticker", "--plugin", "absent.py") == USAGE
    assert capsys.readouterr().err == "pciback: --plugin absent.py: no such file\n"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["module:Class", "--plugin"])
def test_serve_serves_the_users_model_and_lspci_sees_it(tmp_path: Path, how: str) -> None:
    (tmp_path / "ticker.py").write_text(MODEL)
    argv = ["--config", "ticker.toml"]
    if how == "--plugin":
        (tmp_path / "plugin.py").write_text(  # imports its sibling, as a script would
            "from pciback import register_model\nfrom ticker import Ticker\n"
            "register_model('ticker', Ticker)\n"
        )
        argv += ["--plugin", "plugin.py"]
        model = "ticker"
    else:
        model = "ticker:Ticker"
    (tmp_path / "ticker.toml").write_text(CONFIG.format(model=model))
    proc = subprocess.Popen(
        [str(BIN / "pciback"), "serve", *argv],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first == "pciback: listening on unix:./ticker.sock\n", proc.communicate(timeout=5)
        out = subprocess.run(
            [str(BIN / "pcifront"), "lspci", "--connect", "unix:./ticker.sock", "-n"],
            cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == "00:00.0 ff00: 1234:beef (rev 01)\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
