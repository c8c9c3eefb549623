"""Loading a project folder: import its Python files and collect the definitions they declare.

Every ``*.py`` file at the top of the folder (but ``_*.py`` and ``test_*.py``) is imported with the folder on
``sys.path``, so definitions and model code may import each other by plain module names, and the import
paths of learners (``"my_learner:new_learner"``) resolve the same way in every service that has the
project's code (``TIDE_PROJECT``). Module-level Sources, Entities, FeatureViews, Labels and Models are
collected; a Source's schema file is read relative to the file that declares it. The project is named
after its folder unless a module sets ``PROJECT_NAME``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from infra.errors import DefinitionError
from infra.imports import add_code_path
from schemas.definitions import KIND_OF, Project, Source


def _module_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.glob("*.py") if not p.name.startswith("_") and not p.name.startswith("test_")
    )


def _import(path: Path) -> ModuleType:
    name = path.stem  # always executed afresh: a project may be loaded again after an edit
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DefinitionError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except DefinitionError as exc:
        sys.modules.pop(name, None)
        raise DefinitionError(f"{path}: {exc}") from None
    except Exception as exc:
        sys.modules.pop(name, None)
        raise DefinitionError(f"{path}: {type(exc).__name__}: {exc}") from exc
    return module


def _resolve_schema(source: Source, declared_in: Path) -> None:
    """Read a source's schema file (relative to the declaring file) into the source."""
    if not isinstance(source.schema, str):
        return
    path = (declared_in.parent / source.schema).resolve()
    where = f"{declared_in}: source {source.name!r}, field 'schema'"
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DefinitionError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DefinitionError(f"{where}: {path} is not JSON: {exc}") from None
    from fastavro import parse_schema

    try:
        parse_schema(parsed)
    except Exception as exc:
        raise DefinitionError(f"{where}: {path} is not a valid Avro schema: {exc}") from None
    # The one place a definition changes after it is made: its file reference becomes the schema.
    object.__setattr__(source, "schema", parsed)
    try:
        source.check_schema()
    except DefinitionError as exc:
        raise DefinitionError(f"{declared_in}: {exc}") from None


def project_name(root: Path, modules: list[ModuleType]) -> str:
    for module in modules:
        name = getattr(module, "PROJECT_NAME", None)
        if isinstance(name, str):
            return name
    return re.sub(r"[^a-z0-9_]", "_", root.name.lower()).lstrip("_0123456789") or "project"


def load_project(folder: str | Path) -> Project:
    """The validated project declared in ``folder``. Raises :class:`DefinitionError` naming file,
    object and field."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DefinitionError(f"{folder}: no such project folder")
    files = _module_files(root)
    if not files:
        raise DefinitionError(f"{root}: no Python files with definitions")
    add_code_path(root)
    modules = [_import(path) for path in files]
    found: list[Any] = []
    origins: dict[int, str] = {}
    declared_in: dict[int, Path] = {}  # a source's schema path is relative to the file that declares it
    for path, module in zip(files, modules, strict=True):
        for value in vars(module).values():
            if type(value) in KIND_OF and id(value) not in origins:
                origins[id(value)] = str(path.relative_to(root.parent))
                declared_in[id(value)] = path
                found.append(value)
    for value in found:
        for source in _sources_of(value):
            _resolve_schema(source, declared_in.get(id(source), declared_in[id(value)]))
    if not found:
        raise DefinitionError(f"{root}: declares no Source, Entity, FeatureView, Labels or Model")
    return Project.of(project_name(root, modules), found, origins)


def _sources_of(value: Any) -> list[Source]:
    if isinstance(value, Source):
        return [value]
    out = []
    for attr in ("source", "request"):
        child = getattr(value, attr, None)
        if isinstance(child, Source):
            out.append(child)
    labels = getattr(value, "labels", None)
    if labels is not None and isinstance(getattr(labels, "source", None), Source):
        out.append(labels.source)
    return out
