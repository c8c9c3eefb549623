"""The online trainer's stream step: labels joined with served inputs or replayed features, learnt once
by the lineage of each model, versions published (with lineage and blessing) and drift alerts reacted
to (:mod:`online_training.publishing`); the registry and the live view versions followed.

The whole story (paths, exactly-once, limits) is in :mod:`online_training.trainer`; bindings and
lineages in :mod:`online_training.lineage`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from confluent_kafka import Consumer, Producer
from prometheus_client import Counter, Gauge

from features.training import Example, target_of
from features.versions import read_states
from infra.errors import TrainingError
from infra.processor import Incoming
from infra.topics import prefixed, topic
from online_training.blessing import Champions, ChampionScorer
from online_training.history import all_examples, examples_of
from online_training.joins import JoinStore, Waiting, log_entry, now_ms
from online_training.learner import OnlineModel
from online_training.lineage import (
    Binding,
    Lineage,
    binding_of,
    learner_models,
    new_lineage,
    newest_views,
    waiting_views,
)
from online_training.publishing import Publishing
from online_training.refresh import Pending, Seen
from online_training.settings import TrainerSettings
from online_training.triggers import Triggers
from schemas import registry
from schemas.definitions import Model, Project

log = logging.getLogger(__name__)

LEARNT = Counter(
    "tide_trainer_labels_learnt_total", "Labels learnt, by where the inputs came from", ["model", "path"]
)
DUPLICATES = Counter("tide_trainer_labels_duplicate_total", "Labels not learnt: already learnt", ["model"])
WAITING = Gauge("tide_trainer_labels_waiting", "Labels waiting for their prediction or a replay", ["model"])
LINEAGES = Counter("tide_trainer_lineages_started_total", "Lineages started (history replays)", ["model"])
SERVED_ARMS = ("champion", "canary")  # shadow predictions were not what the caller received
SERVED, REPLAYED = "served", "replayed"
LEARN_CHUNK = 5000


@dataclass
class _Build:
    state: Lineage
    future: Future[int]


# A version's inputs as its record names them: (feature names, view versions).
_Inputs = tuple[tuple[str, ...], dict[str, int]]
# A label to learn: (key, inputs, raw target, event time).
_Example = tuple[str, dict[str, Any], Any, int | None]


class TrainerStep(Publishing):
    """The join-learn-publish step over the predictions topic, the models topic and every labels source
    (module docstring). ``models``: each model's learner and Redis state, on the newest view versions
    (start-up uses :func:`restore`, which binds each model to its live view versions)."""

    name = "trainer"

    def __init__(
        self,
        settings: TrainerSettings,
        project: Project,
        producer: Producer,
        models: Mapping[str, tuple[OnlineModel, JoinStore]] | None = None,
        *,
        client: redis.Redis | None = None,
        digest: str | None = None,
    ) -> None:
        self.settings = settings
        self.project = project
        self.digest = digest or project.digest()
        self._producer = producer
        self._client = client
        self.states: dict[str, Lineage] = {}  # the lineage of each model that learns and publishes
        self.building: dict[str, _Build] = {}  # a lineage replaying history, to take over its model
        self.by_labels_source: dict[str, list[Lineage]] = {}
        self._grace_ms = int(settings.trainer_prediction_grace_s * 1000)
        self._consumed = False  # records handled since the last checkpoint
        self._checkpointed_at = time.monotonic()
        self._newest: dict[str, int] = {}  # model -> newest version seen (any flavor)
        self._inputs: dict[str, dict[int, _Inputs]] = {}  # model -> version -> its inputs
        self._waiting: set[str] = set()  # models waiting for a live version of a view (logged once)
        self._failed: dict[str, str] = {}  # model -> fingerprint of a binding that failed to build
        self._follower: registry.Follower | None = None
        self._consumer: Consumer | None = None
        self._expected: dict[str, str | None] = {}
        self._next_refresh = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._on_assign: Callable[..., None] | None = None
        self.champions = Champions()  # each model's newest blessed version
        self.triggers = Triggers()  # drift alerts acted on
        self._scorer = ChampionScorer()
        self._alerts: list[dict[str, Any]] = []  # drift alerts of the current batch
        self.pending: dict[str, Pending] = {}  # refreshes waiting for labels (checkpointed: snapshot)
        self._positions: dict[str, int] = {}  # "topic:partition" -> next offset, of labels and predictions
        for online, store in (models or {}).values():
            self.add(Lineage(online, store, newest_views(project, online.model)))
        self._index()

    def add(self, state: Lineage) -> None:
        """Make ``state`` its model's lineage that learns and publishes."""
        self.states[state.online.name] = state
        self._index()

    def _index(self) -> None:
        by_source: dict[str, list[Lineage]] = {}
        for state in self._all_states():
            by_source.setdefault(state.labels.source.name, []).append(state)
        self.by_labels_source = by_source

    def _all_states(self) -> list[Lineage]:
        return [*self.states.values(), *(b.state for b in self.building.values())]

    # --- the stream ------------------------------------------------------------------------------------

    def handle(self, item: Incoming) -> None:
        self._consumed = True
        v = item.value
        if item.record == "model_version":
            self.seen_version(v)
            return
        if item.record == "drift_alert":
            self._alerts.append(v)
            return
        self._positions[f"{item.topic}:{item.partition}"] = item.offset + 1
        if item.record == "prediction":
            key = v.get("event_id")
            if not key or v["arm"] not in SERVED_ARMS:
                return
            for state in self._states_of(v["model"]):
                if self._served_fits(state, int(v["version"])):
                    state.served[key] = v["features"]
                    state.order.append((False, key))
            return
        for state in self.by_labels_source.get(item.record, ()):
            spec = state.labels
            raw_key, target = v.get(spec.key), v.get(spec.target)
            if raw_key is None or target is None:
                raise TrainingError(f"labels {spec.name!r}: a record without {spec.key!r} or {spec.target!r}")
            ts = v.get(spec.source.event_time)
            key = str(raw_key)
            state.waiting[key] = Waiting(raw_key, target, ts if isinstance(ts, int) else None, now_ms())
            state.order.append((True, key))

    def snapshot(self) -> bytes:
        """The step's checkpointed state: the refreshes waiting for labels (the rest of its state is in
        Redis and on the models topic)."""
        return Pending.dumps(self.pending)

    def restore(self, state: bytes) -> None:
        self.pending = Pending.loads(state)
        for name, waiting in self.pending.items():
            log.info("model %s: a refresh on alert %s waits for labels", name, waiting.alert.get("alert_id"))

    def newest(self, model: str) -> int:
        """The newest version of ``model`` seen (any flavor; 0 when none)."""
        return self._newest.get(model, 0)

    def _states_of(self, model: str) -> list[Lineage]:
        found = [self.states[model]] if model in self.states else []
        if model in self.building:
            found.append(self.building[model].state)
        return found

    def seen_version(self, record: Mapping[str, Any]) -> None:
        """Note a model version on the models topic: its number (the next one published comes after
        it) and its inputs (predictions it made teach only the lineages they fit)."""
        name, version = str(record["model"]), int(record["version"])
        self._newest[name] = max(self._newest.get(name, 0), version)
        views = {str(k): int(n) for k, n in (record.get("view_versions") or {}).items()}
        self._inputs.setdefault(name, {})[version] = (tuple(record.get("feature_names") or ()), views)
        self.champions.seen(record)
        self.triggers.seen(record)

    def note_offsets(self, offsets: Mapping[str, int]) -> None:
        """Positions a resumed version had read (its ``data.offsets``): the next versions' start."""
        for where, offset in offsets.items():
            self._positions[where] = max(self._positions.get(where, 0), int(offset))

    def _served_fits(self, state: Lineage, version: int) -> bool:
        """Whether inputs served by ``version`` of the model are what ``state``'s lineage learns from:
        the same inputs from the same view versions (else the label waits to be learnt from replayed
        features of its own view versions)."""
        found = self._inputs.get(state.online.name, {}).get(version)
        return found is not None and state.binding.serves(*found)

    def flush(self) -> bool:
        for state in self._all_states():
            if state.order:
                self._join(state)
        return self._after_batch()

    def idle(self) -> bool:
        return self._after_batch()

    def _after_batch(self) -> bool:
        now = time.monotonic()
        published = self._refresh(now)
        alerts, self._alerts = self._alerts, []
        for alert in alerts:
            published = self._react(alert) or published
        if self.pending:
            published = self._pending_due() or published
        for state in self.states.values():
            if now >= state.next_catchup:
                state.next_catchup = now + self.settings.trainer_catchup_interval_s
                self.catch_up(state)
            online = state.online
            due = online.since_publish >= online.model.publish_every or (
                online.since_publish and now - state.published_at >= self.settings.trainer_publish_interval_s
            )
            if due:
                self.publish(state)
                published = True
        if (
            not published
            and self._consumed
            and now - self._checkpointed_at >= self.settings.trainer_publish_interval_s
        ):
            # Records that taught nothing unpublished (duplicates, labels parked in Redis, inputs parked
            # for labels to come): their offsets may be committed without a version.
            published = all(state.online.since_publish == 0 for state in self.states.values())
        if published:
            self._consumed = False
            self._checkpointed_at = now
        return published

    def _join(self, state: Lineage) -> None:
        served, waiting, order = state.served, state.waiting, state.order
        state.served, state.waiting, state.order = {}, {}, []
        store = state.store
        by_served, by_label = store.exchange(served, waiting)
        learnt: list[_Example] = []
        done: set[str] = set()
        park: dict[str, Waiting] = {}
        for is_label, key in order:
            if key in done:
                continue
            if is_label:
                parked, marker = by_label[key]
                if store.learnt(marker):
                    DUPLICATES.labels(state.online.name).inc()
                    done.add(key)
                elif parked is not None and not state.building:
                    label_ = waiting[key]
                    learnt.append((key, orjson.loads(parked), label_.y, label_.ts))
                    done.add(key)
                else:
                    park[key] = waiting[key]
            elif not state.building:
                label, marker = by_served[key]
                if label is not None and not store.learnt(marker):
                    w = Waiting.loads(label)
                    learnt.append((key, served[key], w.y, w.ts))
                    done.add(key)
        for key in done:
            park.pop(key, None)
        if state.building:
            # Its learner is the replay's until it takes over: labels wait in its own Redis state, and
            # its first catch-up learns those the replay did not (from inputs served by a version of
            # its binding, else replayed features).
            store.record({}, park, now_ms() + self._grace_ms)
            return
        self._learn(state, learnt, SERVED, park)

    def _learn(
        self,
        state: Lineage,
        examples: Sequence[_Example],
        path: str,
        park: Mapping[str, Waiting] | None = None,
    ) -> None:
        """Learn ``(key, x, raw target, event time)`` in order; write markers, the learn log and labels to
        park; keep each in the lineage's window."""
        online, store = state.online, state.store
        version = online.version + 1
        marker = store.marker(version)
        keep_log = self.settings.trainer_learn_log
        markers: dict[str, bytes] = {}
        entries: list[bytes] = []
        task = online.task
        remember = state.window.append
        for key, x, raw, ts in examples:
            y = target_of(task, raw)
            y_pred = online.learn(x, y)
            remember(Seen(key, x, y, ts, version, y_pred))
            state.saw(ts)
            markers[key] = marker
            if keep_log:
                entries.append(log_entry(store.epoch, version, key, path, y, y_pred))
        store.record(markers, park or {}, now_ms() + self._grace_ms, entries, keep_log)
        if examples:
            LEARNT.labels(online.name, path).inc(len(examples))

    # --- labels of events never scored ----------------------------------------------------------------

    def catch_up(self, state: Lineage) -> int:
        """Learn the labels whose grace has passed: from inputs served meanwhile, else from replayed
        point-in-time features. Returns how many were learnt."""
        store, online = state.store, state.online
        keys = store.due(now_ms(), self.settings.trainer_catchup_max)
        if not keys:
            WAITING.labels(online.name).set(store.pending_count())
            return 0
        forget, todo = [], {}
        for key, (label, marker) in zip(keys, store.waiting(keys), strict=True):
            if label is None:
                forget.append(key)  # expired: waited longer than the join TTL
            elif store.learnt(marker):
                if store.committed_marker(marker, online.version):
                    forget.append(key)
            else:
                todo[key] = label
        store.forget(forget)
        if not todo:
            return 0
        served = [
            (k, x, todo[k].y, todo[k].ts)
            for k, x in zip(todo, store.parked(list(todo)), strict=True)
            if x is not None
        ]
        self._learn(state, served, SERVED)
        rest = [todo[k] for k in todo if k not in {k for k, _, _, _ in served}]
        spec = state.labels
        records = [{spec.key: w.key, spec.target: w.y, spec.source.event_time: w.ts} for w in rest]
        examples = examples_of(self.settings, self.project, online.model, records, state.binding.views)
        self._learn(state, _triples(examples), REPLAYED)
        found = {str(e.key) for e in examples}
        now = now_ms()
        # Events not on the topic (yet): look again after as long as each label has waited (every look
        # replays the topics), until the label expires.
        store.postpone(
            {
                str(w.key): now + max(self._grace_ms, 1000, now - (w.seen_ms or now))
                for w in rest
                if str(w.key) not in found
            }
        )
        WAITING.labels(online.name).set(store.pending_count())
        return len(served) + len(examples)

    def learn(self, model: str, examples: Sequence[Example], path: str = REPLAYED) -> None:
        """Learn ``examples`` of ``model`` in order, as a catch-up does (markers, learn log, counters)."""
        self._learn_all(self.states[model], examples, path)

    def _learn_all(self, state: Lineage, examples: Sequence[Example], path: str = REPLAYED) -> None:
        for start in range(0, len(examples), LEARN_CHUNK):
            self._learn(state, _triples(examples[start : start + LEARN_CHUNK]), path)

    def bootstrap(self, state: Lineage, project: Project | None = None) -> int:
        """Learn every labelled event of history from features replayed through the lineage's view
        versions (a lineage's start)."""
        model = state.online.model
        examples = all_examples(self.settings, project or self.project, model, state.binding.views)
        self._learn_all(state, examples)
        log.info(
            "model %s, lineage %s (%s): learnt %d labels of history",
            model.name,
            state.id or "-",
            state.binding.describe(),
            len(examples),
        )
        return len(examples)

    # --- following the registry and the view versions -------------------------------------------------

    def follow(
        self,
        follower: registry.Follower | None,
        consumer: Consumer | None = None,
        on_assign: Callable[..., None] | None = None,
    ) -> None:
        """Take newer definitions from ``follower`` while running, and keep ``consumer`` subscribed to
        the topics the models being trained need (:meth:`topics`, which the processor loop reads), its
        partitions assigned by ``on_assign`` (the checkpoints' positions) when given."""
        self._follower = follower
        self._consumer = consumer
        self._on_assign = on_assign

    def topics(self) -> dict[str, str | None]:
        """Topic -> the record it carries: predictions, model versions and every labels source of a
        model being trained. The same dict is updated in place when the models change."""
        wanted: dict[str, str | None] = {
            topic(self.settings, "predictions"): "prediction",
            topic(self.settings, "models"): "model_version",
            topic(self.settings, "drift-alerts"): "drift_alert",
        }
        for state in self._all_states():
            source = state.labels.source
            wanted[prefixed(self.settings, source.topic_name)] = source.name
        if wanted != self._expected:
            self._expected.clear()
            self._expected.update(wanted)
        return self._expected

    def _refresh(self, now: float) -> bool:
        """Every ``trainer_follow_interval_s``: newer definitions, the view versions now live, lineages
        to start and those whose replay has finished (they take over, publishing at once when they
        learnt anything). Returns whether a version was published."""
        if self._client is None or now < self._next_refresh:
            return False
        self._next_refresh = now + self.settings.trainer_follow_interval_s
        if self._follower is not None:
            found = self._follower.poll()
            if found is not None:
                self._take_definitions(found.project, found.digest, found.version)
        states = read_states(self._client, self.settings.topic_prefix)
        for model in learner_models(self.project):
            self.rebind(model, binding_of(self.project, model, states), states)
        published = self._take_over()
        self._resubscribe()
        return published

    def _take_definitions(self, project: Project, digest: str, version: int) -> None:
        gone = {m.name for m in learner_models(self.project)} - {m.name for m in learner_models(project)}
        for name in gone:
            self.states.pop(name, None)
            self.building.pop(name, None)
            self._waiting.discard(name)
            log.info("model %s is no longer a model with a learner: not trained any more", name)
        self.project, self.digest = project, digest
        self._index()
        log.info("training with definitions version %d (%s)", version, digest[:12])

    def rebind(self, model: Model, binding: Binding | None, states: Mapping[str, Any]) -> None:
        name = model.name
        active, build = self.states.get(name), self.building.get(name)
        if binding is None:
            if active is None and build is None and name not in self._waiting:
                self._waiting.add(name)
                views = ", ".join(waiting_views(self.project, model, states))
                log.info("model %s waits: no live version of view(s) %s yet", name, views)
            return
        self._waiting.discard(name)
        if active is not None and active.binding.fingerprint == binding.fingerprint:
            # Same lineage: take what else changed (publish_every, metric name, metadata).
            active.binding, active.online.model = binding, model
            active.resize()  # the policy's window may have changed
            if build is not None:
                del self.building[name]
                self._index()
                log.info("model %s: binding back to lineage %s; replay dropped", name, active.id)
            return
        if build is not None and build.state.binding.fingerprint == binding.fingerprint:
            return
        if self._failed.get(name) == binding.fingerprint:
            return
        self._start(model, binding)

    def _start(self, model: Model, binding: Binding) -> None:
        """Start a lineage of ``model`` under ``binding``: its history replay runs in the background
        while the model's current lineage (if any) keeps learning and publishing."""
        assert self._client is not None
        try:
            state = new_lineage(
                self.settings, self.project, binding, self._client, self._newest.get(model.name, 0)
            )
        except TrainingError as exc:
            self._failed[model.name] = binding.fingerprint
            log.error("model %s: cannot start a lineage: %s", model.name, exc)
            return
        state.building = True
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tide-lineage")
        future = self._pool.submit(self.bootstrap, state, self.project)
        self.building[model.name] = _Build(state, future)
        self._index()
        LINEAGES.labels(model.name).inc()
        log.info(
            "model %s: lineage %s starts on %s (%s): replaying history",
            model.name,
            state.id,
            binding.describe(),
            "the current lineage trains meanwhile" if model.name in self.states else "first lineage",
        )

    def _take_over(self) -> bool:
        published = False
        for name, build in list(self.building.items()):
            if not build.future.done():
                continue
            del self.building[name]
            self._index()
            state = build.state
            try:
                learnt = build.future.result()
            except Exception:
                self._failed[name] = state.binding.fingerprint
                log.exception("model %s: lineage %s failed; waits for the next change", name, state.id)
                continue
            state.building = False
            old = self.states.get(name)
            self.add(state)
            log.info(
                "model %s: lineage %s (%s) takes over%s",
                name,
                state.id,
                state.binding.describe(),
                f" from lineage {old.id or '-'}" if old is not None else "",
            )
            if learnt or name not in self._newest:  # a first version (even untrained) lets serving start
                self.publish(state)
                published = True
        return published

    def _resubscribe(self) -> None:
        before = set(self._expected)
        after = set(self.topics())
        if self._consumer is not None and after != before:
            # A rebalance: what was consumed since the last checkpoint comes again, and is learnt once
            # (markers) or parked again.
            if self._on_assign is not None:
                self._consumer.subscribe(list(self._expected), on_assign=self._on_assign)
            else:
                self._consumer.subscribe(list(self._expected))
            log.info("trainer consumes %s", ", ".join(sorted(after)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _triples(examples: Sequence[Example]) -> list[_Example]:
    return [(str(e.key), e.x, e.y, e.ts) for e in examples]
