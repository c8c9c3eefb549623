"""Examples from history: a model's labelled events with point-in-time features, replayed from the topics.

The trainer learns from them when no prediction logged the inputs an event was scored on: every label of
history when a model starts without a river version (:func:`all_examples`), and, later, each label whose
event was never scored (:func:`examples_of`). Both replay the request source, every source the model's
views read, and the labels, through :mod:`features.training` (the code the online feature processor
runs), so each input is what serving would have read when the event was scored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from features.training import Example, examples_for, read_source
from infra.settings import CommonSettings
from schemas.definitions import Model, Project

log = logging.getLogger(__name__)


def _sources(settings: CommonSettings, project: Project, model: Model, with_labels: bool) -> dict[str, Any]:
    assert model.labels is not None
    needed = {model.request.name: model.request}
    needed.update({v.source_name: v.source for v in project.model_views(model)})
    if with_labels:
        needed[model.labels.source.name] = model.labels.source
    # Each read waits for the broker's first fetch: read the topics side by side.
    with ThreadPoolExecutor(max_workers=len(needed)) as pool:
        read = {name: pool.submit(read_source, settings, source) for name, source in needed.items()}
        return {name: future.result() for name, future in read.items()}


def all_examples(settings: CommonSettings, project: Project, model: Model) -> list[Example]:
    """Every labelled event of ``model`` on the topics now, in event-time order (ties by key)."""
    assert model.labels is not None
    records = _sources(settings, project, model, with_labels=True)
    labels = records[model.labels.source.name]
    return examples_for(project, model, records[model.request.name], labels, sources=records)


def examples_of(
    settings: CommonSettings, project: Project, model: Model, labels: Sequence[dict[str, Any]]
) -> list[Example]:
    """The examples of ``labels`` (records with the labels' key, target and event-time fields) whose
    events are on the request source's topic, in event-time order."""
    assert model.labels is not None
    if not labels:
        return []
    records = _sources(settings, project, model, with_labels=False)
    found = examples_for(project, model, records[model.request.name], list(labels), sources=records)
    log.info(
        "model %s: %d of %d waiting labels have their event on the topic", model.name, len(found), len(labels)
    )
    return found
