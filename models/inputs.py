"""A model's inputs, typed from its definition: request fields, the entities it is read for, its features.

:class:`ModelInputs` is built once per model from the project (:meth:`ModelInputs.of`) and is the one
description every part of the model contract uses:

- the request fields with their Avro types (from the request source's schema), which serving validates
  and documents, and which a runtime checks its inputs against;
- the entities whose online features the model reads (the join keys of its views' entities, in the
  order first referenced) and the ``(view, entity value)`` pairs one request reads;
- each feature by its bare name with the type it is served as (counts are integers);
- :meth:`ModelInputs.assemble`, the exact input map scored and logged: request fields in declared
  order, then the features in declared order;
- :meth:`ModelInputs.synthetic`, a neutral input (zero, ``""``, ``False``) a model is warmed up on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from features.store import FeatureRow
from schemas.definitions import FeatureView, Model, Project, nullable

# Avro primitive type -> the neutral value used for synthetic (warm-up) inputs.
ZERO: dict[str, Any] = {"double": 0.0, "float": 0.0, "int": 0, "long": 0, "string": "", "boolean": False}
NUMERIC = frozenset({"double", "float", "int", "long", "boolean"})


@dataclass(frozen=True)
class RequestField:
    """A request field: its name, Avro primitive type, whether it may be null, and its schema doc."""

    name: str
    type: str
    nullable: bool = False
    doc: str = ""


@dataclass(frozen=True)
class FeatureInput:
    """A feature the model reads: ``view.feature``, served under the feature's bare name.

    ``type`` is the Avro type of the value served: ``long`` for counts, the source field's type for
    ``last``, ``double`` for every other aggregation. ``nullable`` when the view serves no value (its
    default is None) while its window is empty.
    """

    view: FeatureView
    name: str
    kind: str
    type: str
    nullable: bool


@dataclass(frozen=True)
class ModelInputs:
    """Everything a model is scored on, from its definition (see the module docstring)."""

    model: Model
    request_fields: tuple[RequestField, ...]
    features: tuple[FeatureInput, ...]
    views: tuple[FeatureView, ...]
    join_keys: tuple[str, ...]
    join_key_types: Mapping[str, str]  # join key -> its Avro type in the request source

    @classmethod
    def of(cls, project: Project, model: Model, versions: Mapping[str, int] | None = None) -> ModelInputs:
        """The inputs of ``model``, one of ``project``'s models, its views resolved in the project: at
        ``versions`` (view name -> version, e.g. a model version's lineage) where given, else the
        newest version of each view."""
        schema = model.request.parsed
        source_fields = model.request.fields
        docs = {f["name"]: str(f.get("doc", "")) for f in schema.get("fields", ())}
        request = tuple(
            RequestField(name, source_fields[name], nullable(schema, name), docs.get(name, ""))
            for name in model.request_fields
        )
        views = tuple(project.model_views(model, versions))
        by_name = {v.name: v for v in views}
        features = []
        for view_name, feature in model.feature_refs:
            view = by_name[view_name]
            agg = next(a for a in view.aggregations if a.name == feature)
            if agg.kind == "count":
                kind = "long"
            elif agg.kind == "last":
                kind = view.source.fields.get(str(agg.field), "string")
            else:
                kind = "double"
            features.append(FeatureInput(view, feature, agg.kind, kind, agg.default is None))
        join_keys = tuple(dict.fromkeys(v.entity_key for v in views))
        return cls(
            model=model,
            request_fields=request,
            features=tuple(features),
            views=views,
            join_keys=join_keys,
            join_key_types={k: source_fields.get(k, "string") for k in join_keys},
        )

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def view_versions(self) -> dict[str, int]:
        """View name -> the version of it these inputs read."""
        return {v.name: v.version for v in self.views}

    @property
    def names(self) -> tuple[str, ...]:
        """Input names in the order the model sees them: request fields, then features."""
        return self.model.input_names

    @property
    def types(self) -> dict[str, str]:
        """Input name -> Avro type of its value."""
        return {f.name: f.type for f in self.request_fields} | {f.name: f.type for f in self.features}

    def strings(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that are inputs with non-numeric values (strings)."""
        types = self.types
        return [n for n in names if n in types and types[n] not in NUMERIC]

    def synthetic(self) -> dict[str, Any]:
        """A neutral input over every input: zero, ``""`` or ``False`` by each one's type."""
        types = self.types
        return {name: ZERO.get(types[name], 0.0) for name in self.names}

    def entity_key(self, entities: Mapping[str, str]) -> str:
        """The request's entity values in join-key order, as one string (what the canary's sticky hash
        and the prediction log's record key are computed over)."""
        return "\x1f".join(entities[k] for k in self.join_keys)

    def pairs(self, entities: Mapping[str, str]) -> list[tuple[FeatureView, str]]:
        """The ``(view, entity value)`` pairs one request reads, one per view."""
        return [(view, entities[view.entity_key]) for view in self.views]

    def assemble(self, fields: Mapping[str, Any], rows: Mapping[str, FeatureRow]) -> dict[str, Any]:
        """The exact input scored and logged: ``fields`` (the request fields), then each feature from
        its view's row (``rows`` by view name); counts as integers."""
        x = dict(fields)
        for f in self.features:
            value = rows[f.view.name].values.get(f.name)
            if f.kind == "count" and value is not None:
                value = int(value)
            x[f.name] = value
        return x


def model_inputs(project: Project) -> dict[str, ModelInputs]:
    """:class:`ModelInputs` of every model of ``project``, by model name."""
    return {name: ModelInputs.of(project, model) for name, model in sorted(project.models.items())}
