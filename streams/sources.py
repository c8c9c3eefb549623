"""Finding a project's source by what a user types: its name or its topic."""

from __future__ import annotations

from infra.errors import DefinitionError
from schemas.definitions import Project, Source


def find_source(project: Project, name: str) -> Source:
    """The source of ``project`` named ``name``, else the one whose topic (before the prefix) is ``name``.

    Raises :class:`DefinitionError` listing the sources (with their topics) when there is neither.
    """
    source = project.sources.get(name)
    if source is not None:
        return source
    for candidate in project.sources.values():
        if candidate.topic_name == name:
            return candidate
    known = ", ".join(
        f"{s.name} (topic {s.topic_name})" for s in sorted(project.sources.values(), key=lambda s: s.name)
    )
    raise DefinitionError(
        f"project {project.name!r} has no source or source topic {name!r}; sources: {known or 'none'}"
    )
