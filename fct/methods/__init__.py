"""Compatibility methods: the registry, the interface, the built-ins and plugin loading."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

from fct.errors import FCTError
from fct.methods.base import METHODS, Deployment, Method, Settings, make_settings, register_method

# Import every built-in module explicitly, so no built-in is "unknown" for want of an import.
from fct.methods import adapters  # noqa: E402,F401  isort: skip
from fct.methods import baselines  # noqa: E402,F401  isort: skip
from fct.methods import fastfill  # noqa: E402,F401  isort: skip
from fct.methods import l2_bct  # noqa: E402,F401  isort: skip
from fct.methods import ract  # noqa: E402,F401  isort: skip

__all__ = [
    "METHODS",
    "Deployment",
    "Method",
    "Settings",
    "make_settings",
    "register_method",
    "load_plugin",
    "load_entry_points",
]

ENTRY_POINT_GROUP = "fct.methods"


def load_plugin(spec: str) -> None:
    """Import a user's method module: a dotted module name or a path to a .py file.

    Nothing is written beside the user's code: Python's bytecode cache (``__pycache__``) is
    off while the plugin imports (fct writes only into its output folders and cache).
    """
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        _load_plugin(spec)
    finally:
        sys.dont_write_bytecode = dont_write


def _load_plugin(spec: str) -> None:
    path = Path(spec)
    try:
        if path.suffix == ".py":
            if not path.is_file():
                raise FCTError(
                    f"plugin file {path} does not exist; pass a module name or an existing .py file"
                )
            name = f"fct_plugin_{path.stem}"
            loaded = sys.modules.get(name)
            if (
                loaded is not None
                and Path(getattr(loaded, "__file__", "")).resolve() == path.resolve()
            ):
                return  # already imported in this process: its methods are registered
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)  # a failed plugin is not "already imported"
                raise
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # a module in the working directory, as `python -m` finds it
            importlib.import_module(spec)
    except FCTError:
        raise
    except Exception as e:  # the plugin's own error, whatever it is
        raise FCTError(
            f"plugin '{spec}' failed to import ({type(e).__name__}: {e}); fix the module or drop --plugin"
        ) from e


def load_entry_points() -> None:
    """Load methods that installed packages declare in the ``fct.methods`` entry point group."""
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:
            raise FCTError(
                f"entry point '{ep.name}' ({ep.value}) of group {ENTRY_POINT_GROUP} failed to load ({e}); fix or uninstall that package"
            ) from e
