"""Publishing the online trainer's versions: each with its lineage and blessing, periodic ones and
refreshes triggered by drift alerts. A part of :class:`online_training.step.TrainerStep` (a mixin over
its state); the comparison a version is blessed by is :mod:`online_training.refresh`'s.

A concept alert that estimates its change point makes a *pending* refresh (one per model; an alert for a
model with one pending is logged and dropped): it is built once the lineage has learnt enough labels since
the change point (:mod:`online_training.refresh`). The pending refreshes are the step's checkpointed
state (:class:`infra.processor.Stateful`), saved in the transaction that commits the alert's offset and
dropped in the one that commits the refresh: across a crash each alert is answered once.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import Producer
from prometheus_client import Counter, Gauge

from features.training import target_of
from infra.errors import TrainingError
from infra.topics import prefixed, topic
from online_training.blessing import Champions, ChampionScorer
from online_training.history import all_examples
from online_training.joins import now_ms, read_log
from online_training.learner import OnlineModel
from online_training.lineage import Lineage, LineageIndex
from online_training.publish import publish_model_version
from online_training.refresh import Pending, Seen, change_point, evaluate, warm
from online_training.settings import TrainerSettings
from online_training.triggers import SCHEDULE, Triggers, trigger_of
from schemas.definitions import Project
from schemas.records import Blessing, TrainingData

log = logging.getLogger(__name__)

PUBLISHED = Counter("tide_trainer_versions_published_total", "Model versions published", ["model"])
METRIC = Gauge("tide_trainer_online_metric", "Progressive metric of the online learner", ["model", "metric"])
REFRESHES = Counter(
    "tide_trainer_refreshes_total", "Versions refreshed on a drift alert, by blessing", ["model", "blessed"]
)
UNBLESSED = Counter("tide_trainer_versions_unblessed_total", "Versions published unblessed", ["model"])


class Publishing:
    """Versions of the step's lineages (module docstring); the attributes are the step's."""

    settings: TrainerSettings
    project: Project
    digest: str
    states: dict[str, Lineage]
    champions: Champions
    triggers: Triggers
    _producer: Producer
    _newest: dict[str, int]
    _scorer: ChampionScorer
    _positions: dict[str, int]
    pending: dict[str, Pending]  # model -> its refresh waiting for labels of the new concept

    def seen_version(self, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def publish(self, state: Lineage, *, wait: bool = False) -> dict[str, Any]:
        """Publish the model's next version: to the step's transactional producer (committed with the
        consumed offsets at the checkpoint that follows), or, with ``wait``, outside any transaction
        (this returns once the broker has the record). Its lineage: the registry digest the trainer runs,
        the view versions of the state's binding, its parent (the lineage's previous version), the data
        it learnt, and its blessing against the champion on the lineage's window
        (:mod:`online_training.refresh`)."""
        window = list(state.window)
        blessing = self._evaluate(state, window, [s.y_pred for s in window])
        data: TrainingData = {"first_ts": state.first_ts, "last_ts": state.last_ts}
        record = self._put(state, state.online, SCHEDULE, state.parent_version, data, blessing, wait=wait)
        state.parent_version = record["version"]
        return record

    def _evaluate(self, state: Lineage, window: Sequence[Seen], candidate: Sequence[Any]) -> Blessing:
        model = state.online.model
        champion = self.champions.of(model.name)
        index = LineageIndex(state.store.client, self.settings.topic_prefix, model.name)
        same = champion is not None and index.of(int(champion["version"])) == state.id
        return evaluate(self.project, model, window, candidate, champion, self._scorer, same_lineage=same)

    def _put(
        self,
        state: Lineage,
        online: OnlineModel,
        trigger: str,
        parent: int | None,
        data: TrainingData,
        blessing: Blessing,
        *,
        wait: bool = False,
        side: bool = False,
    ) -> dict[str, Any]:
        """Publish ``online``'s learner as the model's next version (``side``: no lineage continues from
        it, see :class:`LineageIndex`)."""
        model = online.model
        version = max(online.version, self._newest.get(model.name, 0)) + 1
        state.store.save_metric(version, pickle.dumps(online.metric, protocol=pickle.HIGHEST_PROTOCOL))
        index = LineageIndex(state.store.client, self.settings.topic_prefix, model.name)
        (index.record_side if side else index.record)(version, state.id)
        topics = {
            topic(self.settings, "predictions"),
            prefixed(self.settings, state.labels.source.topic_name),
        }
        offsets = {k: v for k, v in self._positions.items() if k.rpartition(":")[0] in topics}
        record = publish_model_version(
            self.settings,
            model=model.name,
            version=version,
            flavor="river",
            artifact=online.dump(),
            feature_names=model.input_names,
            metric_name=model.metric_name,
            metric_value=online.metric_value(),
            trained_on=online.trained_on,
            reference=online.profile(),
            task=model.task,
            classes=online.sorted_classes(),
            definitions_digest=self.digest,
            view_versions=state.binding.view_versions,
            parent_version=parent,
            trigger=trigger,
            data={**data, "offsets": offsets},
            blessing=blessing,
            producer=None if wait else self._producer,
        )
        state.online.version = version
        online.version = version
        online.since_publish = 0
        state.published_at = time.monotonic()
        self.seen_version(record)
        PUBLISHED.labels(model.name).inc()
        if not blessing["blessed"]:
            UNBLESSED.labels(model.name).inc()
            log.warning("model %s: version %d is not blessed: %s", model.name, version, blessing["reason"])
        if record["metric_value"] is not None:
            METRIC.labels(model.name, model.metric_name).set(record["metric_value"])
        return record

    # --- drift alerts ---------------------------------------------------------------------------------

    def _react(self, alert: Mapping[str, Any]) -> bool:
        """Refresh the model of ``alert`` when its policy says so (:mod:`online_training.triggers`), at
        once or, for a concept alert with a change point, once labels since it are in (module
        docstring); returns whether a version was published."""
        name = str(alert.get("model"))
        state = self.states.get(name)
        if state is None:
            log.debug("drift alert %s: model %s has no lineage trained here", alert.get("alert_id"), name)
            return False
        if not self.triggers.wanted(state.online.model, alert, now_ms()):
            return False
        waiting = self.pending.get(name)
        if waiting is not None:
            log.info(
                "model %s: %s drift alert %s ignored: a refresh waits for labels since alert %s",
                name,
                alert.get("kind"),
                alert.get("alert_id"),
                waiting.alert.get("alert_id"),
            )
            return False
        start = change_point(alert, state.window, state.online.trained_on)
        if start is None:
            return self._refresh_now(state, alert)
        self.pending[name] = Pending(dict(alert), state.id, start, now_ms())
        log.info(
            "model %s: concept drift alert %s: change point %d labels back; the refresh waits for %d labels "
            "since it",
            name,
            alert.get("alert_id"),
            state.online.trained_on - start,
            self._wanted_since(state),
        )
        return self._pending_due()

    def _wanted_since(self, state: Lineage) -> int:
        return min(state.online.model.policy.retrain.window, self.settings.trainer_refresh_min_labels)

    def _pending_due(self) -> bool:
        """Build the pending refreshes whose labels are in (or that waited long enough); returns whether
        a version was published."""
        published = False
        for name, waiting in list(self.pending.items()):
            state = self.states.get(name)
            if state is None:
                del self.pending[name]
                log.info("model %s is not trained any more: refresh on alert %s dropped", name, waiting.alert)
                continue
            since = waiting.since(state.id, state.online.trained_on)
            waited = now_ms() - waiting.noted_ms >= self.settings.trainer_refresh_max_wait_s * 1000
            if since is not None and since < self._wanted_since(state) and not (waited and since > 0):
                continue
            del self.pending[name]
            if since is None:
                log.info(
                    "model %s: another lineage took over while a refresh waited: it uses its window", name
                )
            published = self._refresh_now(state, waiting.alert, since) or published
        return published

    def _refresh_now(self, state: Lineage, alert: Mapping[str, Any], since: int | None = None) -> bool:
        try:
            return self.refresh(state, alert, since) is not None
        except TrainingError as exc:
            name = state.online.name
            log.error("model %s: refresh on drift alert %s failed: %s", name, alert.get("alert_id"), exc)
            return False

    def refresh(
        self, state: Lineage, alert: Mapping[str, Any], since: int | None = None
    ) -> dict[str, Any] | None:
        """A fresh learner warmed on the lineage's window (``since``: on its newest ``since`` examples,
        those after the change point), published as the model's next version (its trigger the alert, its
        parent the champion) and blessed against the champion on the same examples; once blessed it
        becomes the lineage's learner (:mod:`online_training.refresh`); when not, the lineage's own
        learner is published after it if it learnt labels since its last version. None (nothing
        published) when no labelled example is at hand to warm it on."""
        model = state.online.model
        window = self._refresh_window(state)
        if since is not None:
            window = window[-since:] if since > 0 else []
        if not window:
            log.warning(
                "model %s: drift alert %s: no labelled example to warm a fresh learner on; not refreshed",
                model.name,
                alert.get("alert_id"),
            )
            return None
        fresh, preds = warm(
            model, window, reference_size=self.settings.trainer_reference_size, profiled=state.online.profiled
        )
        fresh.version = state.online.version
        blessing = self._evaluate(state, window, preds)
        champion = self.champions.version(model.name)
        stamps = [s.ts for s in window if s.ts is not None]
        data: TrainingData = {"first_ts": min(stamps, default=None), "last_ts": max(stamps, default=None)}
        self.triggers.acting(model.name, alert, now_ms())
        blessed = blessing["blessed"]
        record = self._put(state, fresh, trigger_of(alert), champion, data, blessing, side=not blessed)
        REFRESHES.labels(model.name, str(blessed).lower()).inc()
        log.info(
            "model %s: refreshed on %s drift alert %s as version %d (%d recent labels%s; %s %s, champion "
            "v%s %s; %s)",
            model.name,
            alert.get("kind"),
            alert.get("alert_id"),
            record["version"],
            len(window),
            "" if since is None else " since the change point",
            blessing["metric"],
            _fmt(blessing["candidate_value"]),
            blessing["baseline_version"],
            _fmt(blessing["baseline_value"]),
            "blessed: the lineage continues from it" if blessed else "not blessed: the lineage goes on",
        )
        if blessed:
            version = record["version"]
            state.online = fresh
            state.window = deque(
                (Seen(s.key, s.x, s.y, s.ts, version, p) for s, p in zip(window, preds, strict=True)),
                maxlen=state.window.maxlen,
            )
            state.first_ts, state.last_ts = data["first_ts"], data["last_ts"]
            state.parent_version = version
        elif state.online.since_publish:
            # The lineage's learner holds labels no committed version of the lineage holds, and this
            # transaction commits their offsets: a restart resumes the lineage from its newest version
            # (never from a refresh left beside it) and would not read them again. Publish it too.
            self.publish(state)
        return record

    def _refresh_window(self, state: Lineage) -> list[Seen]:
        """The lineage's window; after a restart (fewer kept than learnt), rebuilt from the newest labels
        of the learn log whose served inputs are still parked in Redis, else from the newest examples of
        history replayed through the lineage's view versions, whichever finds more (the examples this run
        learnt taken from the window)."""
        window = state.window
        size = window.maxlen or 0
        if len(window) >= size or state.online.trained_on <= len(window):
            return list(window)
        found = self._logged(state, size)
        if len(found) < size:
            model = state.online.model
            examples = all_examples(self.settings, self.project, model, state.binding.views)[-size:]
            replayed = [Seen(str(e.key), e.x, target_of(model.task, e.y), e.ts, 0) for e in examples]
            found = replayed if len(replayed) > len(found) else found
        if len(found) <= len(window):
            return list(window)
        # What this run learnt is known better from its own window (event times, its predictions).
        known = {s.key: s for s in window}
        return [known.get(s.key, s) for s in found]

    def _logged(self, state: Lineage, size: int) -> list[Seen]:
        store, model = state.store, state.online.model
        latest: dict[str, dict[str, Any]] = {}
        for entry in read_log(store.client, self.settings.topic_prefix, model.name):
            latest.pop(entry["key"], None)  # ordered by when each was last learnt
            latest[entry["key"]] = entry
        keys = list(latest)[-size:]
        labels = store.waiting(keys)
        return [
            Seen(key, x, target_of(model.task, latest[key]["y"]), None if w is None else w.ts, 0)
            for key, x, (w, _) in zip(keys, store.parked(keys), labels, strict=True)
            if x is not None
        ]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
