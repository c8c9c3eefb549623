"""Model-version lineage: the exact inputs one model version is scored with.

A ``model_version`` record names the inputs it was trained on (``feature_names``: request fields, then
features) and the version of each view it read (``view_versions``: view name -> version). Serving
scores it with exactly those: each feature read from the view version the lineage names
(``Project.view_version``), never another, so a model trained on one version of a view is never
served features of another. A record with empty ``view_versions`` (trained before lineage) reads the
views' current versions.

:func:`pinned_inputs` resolves a record against the definitions served now, as
:class:`~models.inputs.ModelInputs` over the version's own inputs, and refuses
(:class:`LineageMismatch`) a version that cannot be served under them:

- its lineage names a view version the registry does not keep (retired, or not applied here yet);
- it was trained for another task than the model is defined with now;
- one of its inputs is neither a request field of the model nor a feature of the views it reads;
- it reads a view kept per an entity the model's requests no longer carry.

A refusal depends on the definitions, so it is reconsidered when they change (the node may simply lag
the registry); a version refused is never served meanwhile, and what served before keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter

from infra.errors import DefinitionError, LineageMismatch
from models.inputs import ModelInputs
from models.runtime import LoadedModel, LoadPolicy, load_model, view_versions_of
from schemas.definitions import FeatureView, Project

logger = logging.getLogger(__name__)

LINEAGE_REFUSED = Counter(
    "tide_model_lineage_refused_total",
    "Model versions refused because their lineage does not fit the definitions served",
    ["model"],
)


def lineage_of(model: LoadedModel) -> dict[str, Any]:
    """The lineage fields of a loaded version, shaped as its record (to pin it again after a change)."""
    return {
        "model": model.name,
        "version": model.version,
        "task": model.task,
        "feature_names": list(model.feature_names),
        "view_versions": dict(model.view_versions),
    }


def pinned_inputs(project: Project, record: Mapping[str, Any]) -> ModelInputs:
    """The inputs the model version of ``record`` is scored with under ``project`` (see the module
    docstring). Raises :class:`LineageMismatch`."""
    name, version = str(record.get("model")), record.get("version")
    where = f"model {name!r} version {version}"
    model = project.models.get(name)
    if model is None:
        raise LineageMismatch(f"{where}: not a model of the definitions served")
    task = record.get("task") or "binary"
    if task != model.task:
        raise LineageMismatch(f"{where}: trained for a {task} task; the model is now defined as {model.task}")
    lineage = view_versions_of(record)
    views: dict[str, FeatureView] = {}
    if lineage:
        for view_name, v in sorted(lineage.items()):
            try:
                views[view_name] = project.view_version(view_name, v)
            except DefinitionError as exc:
                raise LineageMismatch(
                    f"{where}: trained on view {view_name}@{v}, which the definitions served do not keep "
                    f"(retired, or not applied here yet): {exc}"
                ) from None
    else:
        views = {v.name: v for v in project.model_views(model)}
    trained_with = ", ".join(v.ref for v in views.values()) or "none"
    by_feature = {feature: view_name for view_name, feature in model.feature_refs}
    request: list[str] = []
    refs: list[str] = []
    for n in record.get("feature_names") or model.input_names:
        if n in model.request_fields:
            request.append(n)
            continue
        view_name = by_feature.get(n, "")
        if view_name not in views or n not in views[view_name].feature_names:
            holders = [v.name for v in views.values() if n in v.feature_names]
            if len(holders) != 1:
                raise LineageMismatch(
                    f"{where}: input {n!r} is neither a request field of the model nor a feature of the "
                    f"view versions it was trained on ({trained_with})"
                )
            view_name = holders[0]
        refs.append(f"{view_name}.{n}")
    try:
        own = dataclasses.replace(model, request_fields=tuple(request), features=tuple(refs), monitor=())
        inputs = ModelInputs.of(project, own, {v.name: v.version for v in views.values()})
    except DefinitionError as exc:
        raise LineageMismatch(f"{where}: {exc}") from None
    carried = {view.entity_key for view in project.model_views(model)}
    for view in inputs.views:
        if view.entity_key not in carried:
            raise LineageMismatch(
                f"{where}: reads view {view.ref}, kept per {view.entity_key!r}, which requests for the model "
                "no longer carry"
            )
    return inputs


class Lineage:
    """Loads model versions pinned to their lineage under the definitions served now (``project``,
    replaced whole when the definitions change)."""

    def __init__(self, project: Project, policy: LoadPolicy | None = None) -> None:
        self.project = project
        self.policy = policy or LoadPolicy()

    def pin(self, record: Mapping[str, Any]) -> ModelInputs:
        return pinned_inputs(self.project, record)

    def load(self, record: Mapping[str, Any]) -> tuple[LoadedModel, ModelInputs]:
        """The loaded version and the inputs it is scored with. Raises :class:`ModelLoadError` (a
        :class:`LineageMismatch` when the lineage does not fit)."""
        inputs = self.pin(record)
        return load_model(record, inputs, self.policy), inputs
