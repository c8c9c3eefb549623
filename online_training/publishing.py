"""Publishing the online trainer's versions: each with its lineage and blessing, periodic ones and
refreshes triggered by drift alerts. A part of :class:`online_training.step.TrainerStep` (a mixin over
its state); the comparison a version is blessed by is :mod:`online_training.refresh`'s.
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
from online_training.refresh import Seen, evaluate, warm
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
        """Refresh the model of ``alert`` when its policy says so (:mod:`online_training.triggers`);
        returns whether a version was published."""
        name = str(alert.get("model"))
        state = self.states.get(name)
        if state is None:
            log.debug("drift alert %s: model %s has no lineage trained here", alert.get("alert_id"), name)
            return False
        if not self.triggers.wanted(state.online.model, alert, now_ms()):
            return False
        try:
            return self.refresh(state, alert) is not None
        except TrainingError as exc:
            log.error("model %s: refresh on drift alert %s failed: %s", name, alert.get("alert_id"), exc)
            return False

    def refresh(self, state: Lineage, alert: Mapping[str, Any]) -> dict[str, Any] | None:
        """A fresh learner warmed on the lineage's window, published as the model's next version (its
        trigger the alert, its parent the champion) and blessed against the champion; once blessed it
        becomes the lineage's learner (:mod:`online_training.refresh`); when not, the lineage's own
        learner is published after it if it learnt labels since its last version. None (nothing
        published) when no labelled example is at hand to warm it on."""
        model = state.online.model
        window = self._refresh_window(state)
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
            "model %s: refreshed on %s drift alert %s as version %d (%d recent labels; %s)",
            model.name,
            alert.get("kind"),
            alert.get("alert_id"),
            record["version"],
            len(window),
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
        history replayed through the lineage's view versions, whichever finds more."""
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
        return found if len(found) > len(window) else list(window)

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
