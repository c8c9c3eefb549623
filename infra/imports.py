"""Import an object by its path ``"module:attribute"``, as uvicorn and bytewax take applications."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from infra.errors import ConfigError


def add_code_path(folder: Path | None) -> None:
    """Make modules in ``folder`` (a project's code) importable by their plain names."""
    if folder is not None:
        path = str(Path(folder).resolve())
        if path not in sys.path:
            sys.path.insert(0, path)


def import_object(spec: str, where: str = "") -> Any:
    """The object ``spec`` (``"package.module:name"``) names; :class:`ConfigError` naming ``where``."""
    prefix = f"{where}: " if where else ""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{prefix}{spec!r} is not an import path 'module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"{prefix}cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{prefix}module {module_name!r} has no attribute {attr!r}") from None
