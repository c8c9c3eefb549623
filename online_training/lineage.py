"""What a model's learner is trained with (its binding) and the lineages of learners a trainer keeps.

A model's **binding** is what its learner is a function of: the part of the model's definition that
decides what is learnt (request source and fields, features, task, labels, learner) and, for each view
the model reads, the version it reads: the newest version the feature processor reports live
(:func:`features.versions.serving_version`). A model with a view that has no live version yet has no
binding: it waits.

A **lineage** is one learner trained under one binding, from the history replay on; every version it
publishes records the binding's view versions (and the registry digest the trainer runs), so serving
reads exactly those view versions for it. When the binding changes (a newer view version goes live, or
the model's own definition changes), the trainer starts a new lineage: a fresh learner, trained on the
history replayed through the new view versions' definitions; the old lineage keeps learning and
publishing until the new one takes over.

Each lineage has an id (``<fingerprint>.<n>``: the binding's fingerprint and a counter, so a binding
that comes back gets a fresh learner, not the stale one) and its own trainer state in Redis
(:class:`~online_training.joins.JoinStore`). :class:`LineageIndex` records which lineage published
each river version, so a restarted trainer resumes a model's newest version only when it was trained
under the binding the model has now. Versions published before lineages existed have no entry; they
are resumed (with the state keys of lineage ``""``) when their inputs and view versions fit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import pickle
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from features.versions import serving_version
from infra.errors import ModelLoadError, TrainingError
from models.artifacts import load_river, record_artifact
from online_training.joins import JoinStore, Waiting
from online_training.learner import OnlineModel, build_learner
from online_training.refresh import Seen
from online_training.settings import TrainerSettings
from schemas.definitions import META, FeatureView, Labels, Model, Project

log = logging.getLogger(__name__)

LEGACY = ""  # the lineage of versions published before lineages: its Redis keys are the old ones
SIDE = "~"  # index entries of versions no lineage continues from (a refresh that was not blessed)


def learning_definition(model: Model) -> dict[str, Any]:
    """The part of ``model``'s definition its learner is a function of (no metadata, metric, publishing
    cadence or monitored inputs: changing those starts no new lineage)."""
    labels = model.labels.to_dict() if model.labels is not None else None
    return {
        "task": model.task,
        "request": model.request.name,
        "request_fields": list(model.request_fields),
        "features": list(model.features),
        "labels": None if labels is None else {k: v for k, v in labels.items() if k not in META},
        "learner": model.learner,
    }


@dataclass(frozen=True)
class Binding:
    """A model and the version of each view it reads (see the module docstring)."""

    model: Model
    views: tuple[FeatureView, ...]  # one version per view the model reads, in the order first referenced

    @functools.cached_property
    def view_versions(self) -> dict[str, int]:
        """View name -> version: the lineage a published version records."""
        return {v.name: v.version for v in self.views}

    @functools.cached_property
    def fingerprint(self) -> str:
        body = {"model": learning_definition(self.model), "views": sorted(v.ref for v in self.views)}
        blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def describe(self) -> str:
        return ", ".join(v.ref for v in self.views) or "no views"

    def serves(self, feature_names: Sequence[str], view_versions: Mapping[str, int]) -> bool:
        """Whether a version with these inputs and view versions (its record's) was served the inputs
        this binding learns from: the same input names, from the same view versions (a record without
        view versions predates versioned views: every view at version 1)."""
        if tuple(feature_names) != self.model.input_names:
            return False
        views = dict(view_versions) or {name: 1 for name in self.view_versions}
        return views == self.view_versions

    def owns(self, lineage: str) -> bool:
        """Whether ``lineage`` (an id) was started for this binding."""
        return lineage.partition(".")[0] == self.fingerprint


def newest_views(project: Project, model: Model) -> Binding:
    """The binding on the newest version of every view (no live state consulted)."""
    return Binding(model, tuple(project.model_views(model)))


def binding_of(project: Project, model: Model, states: Mapping[str, Any]) -> Binding | None:
    """``model`` bound to the newest live version of each view it reads (``states``: the view states,
    :func:`features.versions.read_states`); None while a view has no live version."""
    views = []
    for name in dict.fromkeys(v for v, _ in model.feature_refs):
        view = serving_version(project, states, name)
        if view is None:
            return None
        views.append(view)
    return Binding(model, tuple(views))


def waiting_views(project: Project, model: Model, states: Mapping[str, Any]) -> list[str]:
    """The views ``model`` reads that have no live version (for logs)."""
    names = dict.fromkeys(v for v, _ in model.feature_refs)
    return [name for name in names if serving_version(project, states, name) is None]


class LineageIndex:
    """One model's lineages in Redis: the counter ids are drawn from and which lineage published each
    river version (``<ns>tide:train:<model>:lineages``, version -> lineage id)."""

    def __init__(self, client: redis.Redis, namespace: str, model: str) -> None:
        self.client = client
        self.key = f"{namespace}tide:train:{model}:lineages"
        self.counter = f"{namespace}tide:train:{model}:lineage-seq"

    def new(self, binding: Binding) -> str:
        """A fresh lineage id for ``binding``."""
        return f"{binding.fingerprint}.{int(self.client.incr(self.counter))}"

    def record(self, version: int, lineage: str) -> None:
        """``version`` is published by ``lineage`` (written before the version can commit)."""
        self.client.hset(self.key, str(version), lineage)

    def record_side(self, version: int, lineage: str) -> None:
        """``version`` was made beside ``lineage`` (an unblessed refresh): never resumed from."""
        self.client.hset(self.key, str(version), SIDE + lineage)

    def of(self, version: int) -> str | None:
        found = cast(bytes | None, self.client.hget(self.key, str(version)))
        return None if found is None else found.decode()


def resumable(record: Mapping[str, Any], binding: Binding, index: LineageIndex) -> str | None:
    """The lineage to resume from river version ``record``, or None when it was trained under another
    binding than ``binding`` (a new lineage must start)."""
    lineage = index.of(int(record["version"]))
    if lineage is not None and lineage.startswith(SIDE):
        return None
    if lineage is not None:
        return lineage if binding.owns(lineage) else None
    fits = (record.get("task") or "binary") == binding.model.task and binding.serves(
        record.get("feature_names") or (), record.get("view_versions") or {}
    )
    return LEGACY if fits else None


def learner_models(project: Project) -> list[Model]:
    """The models the online trainer trains: those with a learner (and so labels), by name."""
    return [m for _, m in sorted(project.models.items()) if m.learner is not None and m.labels is not None]


def labels_of(model: Model) -> Labels:
    if model.labels is None:
        raise TrainingError(f"model {model.name!r} declares no labels: it has nothing to learn from")
    return model.labels


@dataclass
class Lineage:
    """One lineage of a model in the trainer: its learner, binding and Redis state, and what the current
    batch brought it. ``building``: its history replay still runs (it parks labels, learns none).
    ``window``: the newest examples learnt (the blessing's window, see :mod:`online_training.refresh`);
    ``first_ts`` / ``last_ts``: the event-time range of what its learner learnt (a version's data)."""

    online: OnlineModel
    store: JoinStore
    binding: Binding
    building: bool = False
    published_at: float = field(default_factory=time.monotonic)
    next_catchup: float = 0.0
    served: dict[str, dict[str, Any]] = field(default_factory=dict)
    waiting: dict[str, Waiting] = field(default_factory=dict)
    order: list[tuple[bool, str]] = field(default_factory=list)  # (is a label, key) in arrival order
    window: deque[Seen] = field(default_factory=deque)
    parent_version: int | None = None  # the version its next one continues from (its newest, else the
    # champion when it started)
    first_ts: int | None = None
    last_ts: int | None = None

    def __post_init__(self) -> None:
        self.resize()

    def resize(self) -> None:
        """Keep the window at the model's ``policy.retrain.window`` (after a definition change too)."""
        size = self.binding.model.policy.retrain.window
        if self.window.maxlen != size:
            self.window = deque(self.window, maxlen=size)

    def saw(self, ts: int | None) -> None:
        if ts is not None:
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)

    @property
    def id(self) -> str:
        return self.store.lineage

    @property
    def labels(self) -> Labels:
        return labels_of(self.binding.model)


def lineage_store(settings: TrainerSettings, model: Model, client: redis.Redis, lineage: str) -> JoinStore:
    """The Redis state of ``model``'s ``lineage`` (entries live the join TTL plus the labels' delay)."""
    ttl = settings.trainer_join_ttl_s + labels_of(model).max_delay_ms // 1000
    return JoinStore(client, settings.topic_prefix, model.name, ttl, lineage)


def new_lineage(
    settings: TrainerSettings, project: Project, binding: Binding, client: redis.Redis, newest: int
) -> Lineage:
    """A fresh lineage of ``binding.model``: a new learner and its own Redis state, nothing learnt yet
    (``newest``: the model's newest version, of any flavor). TrainingError when the learner cannot be
    built."""
    model = binding.model
    learner = build_learner(model)
    store = lineage_store(
        settings, model, client, LineageIndex(client, settings.topic_prefix, model.name).new(binding)
    )
    store.start_epoch(0)
    online = OnlineModel(
        model,
        learner,
        version=newest,
        reference_size=settings.trainer_reference_size,
    )
    return Lineage(online, store, binding)


def resume_lineage(
    settings: TrainerSettings,
    project: Project,
    binding: Binding,
    lineage: str,
    river: Mapping[str, Any],
    client: redis.Redis,
    newest: int,
) -> Lineage:
    """``lineage`` of ``binding.model`` resumed from its newest river version ``river`` (its learner and
    metric; the labels learnt since by a run that crashed are learnt again, once: see
    :mod:`online_training.joins`)."""
    model = binding.model
    store = lineage_store(settings, model, client, lineage)
    try:
        learner = load_river(record_artifact(river), river["sha256"])
    except ModelLoadError as exc:
        raise TrainingError(
            f"model {model.name!r}: cannot resume from version {river['version']}: {exc}"
        ) from exc
    store.start_epoch(int(river["version"]))
    metric = None
    blob = store.load_metric(int(river["version"]))
    if blob is not None:
        try:
            metric = pickle.loads(blob)
        except Exception as exc:  # a metric of another river version: start it afresh
            log.warning(
                "model %s: metric state of version %s not restored: %s", model.name, river["version"], exc
            )
    log.info(
        "model %s: resuming from version %d (trained on %d, lineage %s: %s)",
        model.name,
        river["version"],
        river["trained_on"],
        lineage or "-",
        binding.describe(),
    )
    data = river.get("data") or {}
    online = OnlineModel(
        model,
        learner,
        metric=metric,
        version=newest,
        trained_on=int(river["trained_on"]),
        classes=tuple(river.get("classes") or ()),
        reference_size=settings.trainer_reference_size,
    )
    return Lineage(
        online,
        store,
        binding,
        parent_version=int(river["version"]),
        first_ts=data.get("first_ts"),
        last_ts=data.get("last_ts"),
    )
