"""``tide init DIR``: a small working project to start from (copied from ``tide/template``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from infra.errors import ConfigError

TEMPLATE = Path(__file__).with_name("template")


def scaffold(folder: Path) -> list[Path]:
    """Copy the template project into ``folder`` (new or empty); returns the files written."""
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder}: exists and is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(TEMPLATE.iterdir()):
        if path.is_file() and path.suffix in (".py", ".avsc"):
            written.append(Path(shutil.copy(path, folder / path.name)))
    return written
