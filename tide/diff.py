"""What a ``tide apply`` changes against the registered definitions, each change classed.

- ``metadata``: description, owner, tags. Touches nothing that runs.
- ``additive``: something new (a source, entity, view, feature, labels or model), a compatible schema
  evolution, or a setting that changes behaviour from now on without invalidating anything stored or
  trained (a model's metric, publish cadence, monitored inputs or loop policy, a source's future skew,
  a label delay).
- ``breaking``: what invalidates stored features or trained models: a view's source, entity, window,
  tile, lateness, ttl or aggregations; a model's inputs, task, labels or learner; a source's topic, key,
  event time or partitions; a removal. ``tide apply`` refuses these without ``--allow-breaking``.

A view whose computation changes (breaking, or features added) gets a new version: its own keys in the
online store, backfilled from its source while the running version keeps serving (:func:`assign_versions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from schemas.definitions import META, FeatureView, Project

KINDS = ("sources", "entities", "views", "labels", "models")
# Per kind, the fields whose change is additive (behaviour from now on); every other non-metadata field
# is breaking.
ADDITIVE_FIELDS: Mapping[str, frozenset[str]] = {
    "sources": frozenset({"schemas", "max_future_skew_ms"}),
    "entities": frozenset(),
    "views": frozenset(),
    "labels": frozenset({"max_delay_ms"}),
    "models": frozenset({"metric", "publish_every", "monitor", "policy"}),
}
KIND_WORD = {
    "sources": "source",
    "entities": "entity",
    "views": "view",
    "labels": "labels",
    "models": "model",
}


def _change(kind: str, name: str, change: str, klass: str, detail: str) -> dict[str, str]:
    return {"kind": kind, "name": name, "change": change, "class": klass, "detail": detail}


def _view_change(name: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, str]:
    """A changed view: features only added -> additive; any other change of computation -> breaking."""
    skip = ("features", "version", *META)
    fields = sorted(k for k in a.keys() | b.keys() if k not in skip and a.get(k) != b.get(k))
    old = {f["name"]: f for f in a["features"]}
    new = {f["name"]: f for f in b["features"]}
    added = [n for n in new if n not in old]
    altered = sorted(n for n in old if n in new and old[n] != new[n])
    removed = sorted(n for n in old if n not in new)
    parts = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in fields]
    parts += [f"feature {n!r} changed" for n in altered] + [f"feature {n!r} removed" for n in removed]
    if parts:
        return _change("views", name, "changed", "breaking", "; ".join(parts) + " (new version, backfilled)")
    if added:
        return _change(
            "views",
            name,
            "changed",
            "additive",
            f"features added: {', '.join(added)} (new version, backfilled)",
        )
    return _change("views", name, "changed", "metadata", "; ".join(_meta_fields(a, b)))


def _meta_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k} changed" for k in META if a.get(k) != b.get(k)]


def diff(before: Project | None, after: Project) -> list[dict[str, str]]:
    """Every change from ``before`` to ``after``: ``{"kind", "name", "change", "class", "detail"}``, with
    change added/changed/removed and class metadata/additive/breaking."""
    old = before.to_dict() if before else {k: [] for k in KINDS}
    new = after.to_dict()
    out: list[dict[str, str]] = []
    for kind in KINDS:
        a = {d["name"]: d for d in old[kind]}
        b = {d["name"]: d for d in new[kind]}
        for name in b:
            if name not in a:
                out.append(_change(kind, name, "added", "additive", f"new {KIND_WORD[kind]}"))
                continue
            if a[name] == b[name]:
                continue
            if kind == "views":
                out.append(_view_change(name, a[name], b[name]))
                continue
            fields = [k for k in sorted(a[name].keys() | b[name].keys()) if a[name].get(k) != b[name].get(k)]
            behaviour = [k for k in fields if k not in META]
            breaking = [k for k in behaviour if k not in ADDITIVE_FIELDS[kind]]
            if kind == "sources" and "schemas" in fields:
                count = len(b[name]["schemas"])
                detail = [f"schema evolved to version {count} (reads every earlier version)"]
                detail += [f"{k} changed" for k in fields if k != "schemas"]
            else:
                detail = [f"{k} {a[name].get(k)!r} -> {b[name].get(k)!r}" for k in behaviour]
                detail += _meta_fields(a[name], b[name])
            klass = "breaking" if breaking else "additive" if behaviour else "metadata"
            out.append(_change(kind, name, "changed", klass, "; ".join(detail)))
        for name in a:
            if name not in b:
                out.append(_change(kind, name, "removed", "breaking", f"{KIND_WORD[kind]} removed"))
    return out


def versioned(
    before: Project | None, after: Project, registry_version: int, retired: Collection[str] = ()
) -> Project:
    """``after`` with view versions assigned for registry version ``registry_version``.

    A view keeps its registered version while what it computes is unchanged; a changed or new one takes
    ``registry_version`` (so a number is never reused), and the registered version of a changed view is
    kept as a previous version: computed and served to the model versions trained on it until the feature
    processor retires it. Earlier kept versions stay, except those in ``retired`` (``name@version``), those
    of removed views and those whose source or entity left the project.
    """
    views: dict[str, FeatureView] = {}
    previous: dict[str, FeatureView] = {}
    for name, view in after.views.items():
        old = before.views.get(name) if before else None
        if old is not None and old.computation() == view.computation():
            views[name] = dataclasses.replace(view, version=old.version)
            continue
        views[name] = dataclasses.replace(view, version=registry_version)
        if old is not None:
            previous[old.ref] = old
    if before is not None:
        for ref, old in before.previous_views.items():
            if old.name in views:
                previous.setdefault(ref, old)
    kept = [
        v.to_dict()
        for ref, v in previous.items()
        if ref not in retired and v.source_name in after.sources and v.entity.name in after.entities
    ]
    body = {**after.to_dict(), "views": [v.to_dict() for v in views.values()], "previous_views": kept}
    return dataclasses.replace(Project.from_dict(body), origins=after.origins)
