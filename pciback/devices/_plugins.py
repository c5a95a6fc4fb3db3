"""Device models from the user's own code: ``model = "module:Class"`` and ``--plugin FILE``.

Both run code the operator chose (the config file and the command line are
trusted, unlike anything a guest sends). A model named ``"module:Class"`` is
imported from ``sys.path`` or, failing that, from the config file's directory,
so a ``ticker.py`` beside ``backend.toml`` needs no launcher script and no
installed package. ``--plugin FILE`` runs a Python file before the config is
read, for models that register themselves with ``pciback.register_model``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from pciback.devices._base import DeviceProvider
from shared.errors import ConfigFileError, UsageError, did_you_mean

__all__ = ["import_model", "load_plugin"]


def _import(module: str, where: str, base: Path | None) -> ModuleType:
    """``module`` from sys.path, else from ``base`` (the config file's directory)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        local = base is not None and (
            (base / f"{top}.py").is_file() or (base / top / "__init__.py").is_file()
        )
        if exc.name != top or not local:
            raise ConfigFileError(
                f"{where}.model: cannot import module {module!r} ({exc}); it must be on "
                f"Python's path or beside the config file"
                + (f" (in {base})" if base is not None else "")
            ) from exc
    assert base is not None
    sys.path.append(str(base))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(base))


def import_model(spec: str, where: str, base: Path | None) -> Callable[[], DeviceProvider]:
    """The factory ``model = "module:Class"`` names (``Class`` may be ``Outer.Inner``).

    Raises ConfigFileError naming ``where`` when the module cannot be imported
    (errors inside it included), the name is missing, or it is not a
    :class:`DeviceProvider` class.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigFileError(
            f"{where}.model: {spec!r} is not of the form \"module:Class\" (e.g. \"ticker:Ticker\")"
        )
    try:
        module = _import(module_name, where, base)
    except ConfigFileError:
        raise
    except Exception as exc:  # the user's module failed while importing: say where
        raise ConfigFileError(
            f"{where}.model: importing {module_name!r} failed: {type(exc).__name__}: {exc} "
            "(run with -v for the traceback)"
        ) from exc
    found: object = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            names = [n for n in dir(found) if not n.startswith("_")]
            raise ConfigFileError(
                f"{where}.model: {module_name!r} has no {part!r}; {did_you_mean(part, names)}"
            )
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, DeviceProvider)):
        raise ConfigFileError(
            f"{where}.model: {spec!r} is not a device model class (a subclass of "
            "pciback.devices.EmulatedDevice or DeviceProvider)"
        )
    return found


def load_plugin(path: str | Path) -> ModuleType:
    """Run the Python file ``path`` as module ``<its stem>`` (``pciback --plugin``).

    While it runs, its directory is on ``sys.path`` (as for ``python FILE``).

    The module stays in ``sys.modules`` under its stem, so ``model = "stem:Class"``
    and the file's own ``register_model`` calls both find it.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--plugin {path}: no such file")
    name = file.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == file.resolve():
            return loaded
        raise UsageError(
            f"--plugin {path}: a module named {name!r} is already loaded from elsewhere; "
            "rename the file"
        )
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UsageError(f"--plugin {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # As for `python FILE`: the file's own directory is on the path while it runs,
    # so it can import its siblings.
    here = str(file.resolve().parent)
    sys.path.insert(0, here)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failed: one line, -v shows the traceback
        del sys.modules[name]
        raise ConfigFileError(
            f"--plugin {path}: {type(exc).__name__}: {exc} (run with -v for the traceback)"
        ) from exc
    finally:
        sys.path.remove(here)
    return module
