"""Examples from history: a model's labelled events with point-in-time features, replayed from the topics.

The trainer learns from them when no prediction logged the inputs an event was scored on: every label of
history when a model starts a lineage (:func:`all_examples`), and, later, each label whose event was
never scored (:func:`examples_of`). Both replay the request source, every source the model's views read,
and the labels, through :mod:`features.training` (the code the online feature processor runs), so each
input is what serving would have read when the event was scored. ``views`` names the version of each
view to replay (a lineage's; default: the newest of each).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from features.training import Example, examples_for, read_source
from infra.settings import CommonSettings
from schemas.definitions import FeatureView, Model, Project

log = logging.getLogger(__name__)


def _sources(
    settings: CommonSettings,
    model: Model,
    views: Sequence[FeatureView],
    with_labels: bool,
) -> dict[str, Any]:
    assert model.labels is not None
    needed = {model.request.name: model.request}
    needed.update({v.source_name: v.source for v in views})
    if with_labels:
        needed[model.labels.source.name] = model.labels.source
    # Each read waits for the broker's first fetch: read the topics side by side.
    with ThreadPoolExecutor(max_workers=len(needed)) as pool:
        read = {name: pool.submit(read_source, settings, source) for name, source in needed.items()}
        return {name: future.result() for name, future in read.items()}


def all_examples(
    settings: CommonSettings,
    project: Project,
    model: Model,
    views: Sequence[FeatureView] | None = None,
) -> list[Example]:
    """Every labelled event of ``model`` on the topics now, in event-time order (ties by key)."""
    assert model.labels is not None
    views = list(views) if views is not None else project.model_views(model)
    records = _sources(settings, model, views, with_labels=True)
    labels = records[model.labels.source.name]
    return examples_for(project, model, records[model.request.name], labels, sources=records, views=views)


def examples_of(
    settings: CommonSettings,
    project: Project,
    model: Model,
    labels: Sequence[dict[str, Any]],
    views: Sequence[FeatureView] | None = None,
) -> list[Example]:
    """The examples of ``labels`` (records with the labels' key, target and event-time fields) whose
    events are on the request source's topic, in event-time order."""
    assert model.labels is not None
    if not labels:
        return []
    views = list(views) if views is not None else project.model_views(model)
    records = _sources(settings, model, views, with_labels=False)
    found = examples_for(
        project, model, records[model.request.name], list(labels), sources=records, views=views
    )
    log.info(
        "model %s: %d of %d waiting labels have their event on the topic", model.name, len(found), len(labels)
    )
    return found
