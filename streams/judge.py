"""The canary and shadow judge (``tide judge``): labels joined with predictions, candidates decided.

The judge reads the predictions topic, every judged model's labels source, the models topic (the
versions that exist) and the deployments topic (which version is canary or shadow, and when that ends;
the semantics of :mod:`serving.deployments`, read from the records). For each model of the project that
has labels:

- labels are joined with predictions by event id (:mod:`streams.outcomes`), and each labelled prediction
  gets its per-event loss;
- a **shadow** version is compared *paired*: its loss minus the champion's on the same event; a
  **canary** *unpaired*: its losses against the champion's over the same period (its sticky share of the
  entities against the rest) — both with an always-valid confidence sequence (:mod:`streams.sequential`)
  and the rules of :mod:`streams.verdict`, guardrails from the prediction log included
  (:mod:`streams.guardrails`);
- verdicts go to ``canary-verdicts``: interim ones (``final`` false) at most every
  ``judge_verdict_every_s`` of stream time while something changed, and exactly one final one per
  candidate (pass, fail, inconclusive at ``max_duration_s``, or ``ended`` when its deployment ended
  first). With the model's policy ``promote``, a pass publishes a ``promote`` deployment; with
  ``rollback``, a fail ends the canary (``canary`` at weight 0) or the shadow (``shadow`` with no
  version); ``source`` ``judge`` and the verdict's id and rule as the reason. The verdict's ``action``
  says what was published (``promote`` / ``rollback``; null when the policy only reports);
- with ``policy.drift.concept``, the champion's losses feed one :class:`streams.concept.ConceptMonitor`
  per model and *lineage* of versions (a version continues its ``parent_version``'s monitor unless its
  ``trigger`` names a drift alert: :mod:`streams.judging`); a change it finds is a ``drift_alert`` of kind
  ``concept`` on ``drift-alerts``, naming the version whose loss fired it.

**Labels of a model not served are not held.** A label is held in a model's join only while a prediction
of that model may meet it: one was read within the labels' ``max_delay`` before the label's time, or the
predictions read have not reached that time yet. Otherwise (a model defined with labels but never scored,
or no longer) it is counted (``tide_judge_labels_ignored_total``, reason ``model_not_served``) and
dropped, not dead-lettered; so is a held label that expires unmatched while its model was not served
near its time. Such a model is also left out of the flow control, which pauses a labels topic only for
the models served that read it, so one model's labels never hold back another's.

**Predictions before their version.** The models topic and the predictions topic are read side by side,
so a prediction may come before its version's record. It is held (at most ``judge_max_held`` per model)
and scored when the version comes; one whose version has not come within ``judge_version_wait_s`` of
stream time or ``judge_version_wait_records`` records read is dead-lettered as ``unknown_version``.

Everything is produced in the processor's Kafka transaction, with a checkpoint of the step's whole
state (joins, statistics, guardrails, monitors; :meth:`JudgeStep.snapshot`) and its positions
(:class:`schemas.checkpoints.KafkaCheckpoints`): killed at any moment, a restarted judge repeats and
loses nothing. Time is stream time (the newest record timestamp read), so a replay decides alike.

The service around the step (producer, consumer, checkpoints, ``tide judge``) is
:mod:`streams.judge_service`.

Bad input is counted (``tide_judge_bad_records_total`` by reason) and dead-lettered with the reason,
never stopping the judge or touching a verdict: a label of the wrong type, a duplicate label, a label
without key (at once, by the processor), a prediction of a version never seen on the models topic, and a
label whose event had no prediction within the labels' ``max_delay`` (when it expires, produced in the
transaction by the step).

Held labels, held predictions and the lineages are part of the checkpointed state.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer
from prometheus_client import Counter
from pydantic import Field

from infra import processor
from infra.errors import SchemaError, StreamError
from infra.letters import DeadLetter
from infra.settings import CommonSettings
from infra.topics import prefixed, topic
from schemas import codec, registry
from schemas.checkpoints import KafkaCheckpoints
from schemas.definitions import Project
from streams.judging import Emitter, ModelState, chain_of, judged_models
from streams.outcomes import Held, LabelSeen, Scored, Unpublished, target

log = logging.getLogger(__name__)

STEP_NAME = "judge"
FOLLOW_INTERVAL_S = 0.5
LARGE_STATE = 8 << 20  # uncompressed snapshot size worth a warning

BAD_RECORDS = Counter("tide_judge_bad_records_total", "Records the judge dead-lettered", ["model", "reason"])
JOINED = Counter("tide_judge_labels_joined_total", "Labelled predictions joined", ["model", "arm"])
IGNORED = Counter(
    "tide_judge_labels_ignored_total", "Labels neither held nor dead-lettered", ["model", "reason"]
)
NOT_SERVED = "model_not_served"


class JudgeSettings(CommonSettings):
    """Settings of the canary judge (``TIDE_JUDGE_*``)."""

    judge_group: str = Field(default="tide-judge", pattern=r"^[A-Za-z0-9._-]+$")
    judge_verdict_every_s: float = Field(default=10.0, gt=0)  # interim verdicts, stream time
    # Events held in one model's join (for the labels' max_delay); it bounds the checkpoint, about 50
    # bytes per held prediction once compressed: keep it well under the broker's message size.
    judge_max_pending: int = Field(default=5_000, ge=10)
    judge_checkpoint_interval_s: float = Field(default=1.0, ge=0)
    judge_batch: int = Field(default=500, ge=1)
    # Predictions read before their version's record (module docstring): held per model, at most this
    # many, each until this much stream time or this many records read have passed without its version.
    judge_max_held: int = Field(default=1_000, ge=1)
    judge_version_wait_s: float = Field(default=30.0, gt=0)
    judge_version_wait_records: int = Field(default=5_000, ge=1)


def _reason(exc: Exception) -> str:
    return str(exc).split(":", 1)[0]


class JudgeStep:
    """Stream step ``judge`` (module docstring). ``emitter`` produces verdicts, deployments, alerts and
    late dead letters into the processor's open transaction."""

    name = STEP_NAME

    def __init__(self, settings: JudgeSettings, project: Project, emitter: Emitter) -> None:
        self._settings = settings
        self._emitter = emitter
        self._project = project
        self._follower: registry.Follower | None = None
        self._consumer: Consumer | None = None
        self._checkpoints: KafkaCheckpoints | None = None
        self._next_follow = 0.0
        self._expected: dict[str, str | None] = {}
        self._since_checkpoint = False
        self._subscribed: list[str] = []
        self._paused: set[str] = set()  # topics paused by the flow control
        # The state checkpointed (snapshot/restore): all of it is in these.
        self.clock_ms = 0
        self.read = 0  # records handled
        self.models: dict[str, ModelState] = {}
        self.versions: dict[str, set[int]] = {}  # every model's versions seen on the models topic
        self.chains: dict[str, dict[int, int]] = {}  # model -> version -> its lineage's first version
        self.held = Unpublished(  # predictions waiting for their version
            settings.judge_max_held, settings.judge_version_wait_s * 1000, settings.judge_version_wait_records
        )
        self.deployed: dict[str, dict[str, int | None]] = {}  # model -> {"canary": v, "shadow": v}
        self._take(project)

    # -- definitions ---------------------------------------------------------------------------------

    def _take(self, project: Project) -> None:
        self._project = project
        wanted = judged_models(project)
        for name in set(self.models) - set(wanted):
            del self.models[name]
            log.info("model %s is not judged any more (removed, or without labels)", name)
        for name, model in wanted.items():
            if name in self.models:
                self.models[name].redefine(model, self._settings.judge_max_pending)
            else:
                self.models[name] = ModelState.of(model, self._settings.judge_max_pending)
                log.info("judging model %s (labels %s)", name, model.labels.name if model.labels else "-")
        self.topics()

    def topics(self) -> dict[str, str | None]:
        """Topic -> record: predictions, models, deployments and every judged model's labels source.
        The same dict, updated in place when the definitions change (the processor decodes with it)."""
        wanted: dict[str, str | None] = {
            topic(self._settings, "predictions"): "prediction",
            topic(self._settings, "models"): "model_version",
            topic(self._settings, "deployments"): "deployment",
        }
        for state in self.models.values():
            source = state.labels_source
            wanted[prefixed(self._settings, source.topic_name)] = source.name
        if wanted != self._expected:
            self._expected.clear()
            self._expected.update(wanted)
        return self._expected

    def follow(
        self,
        follower: registry.Follower | None,
        consumer: Consumer | None = None,
        checkpoints: KafkaCheckpoints | None = None,
    ) -> None:
        """Take newer definitions from ``follower`` between batches; subscribe ``consumer`` to new labels
        topics (right after a checkpoint, so what is re-read on the rebalance was never counted)."""
        self._follower, self._consumer, self._checkpoints = follower, consumer, checkpoints
        self._subscribed = sorted(self._expected)  # what the processor subscribes to at start

    def update(self, project: Project) -> None:
        """Judge the models of ``project`` from now on (tests call this; the follower does it live)."""
        self._take(project)

    def _poll_registry(self) -> None:
        now = time.monotonic()
        if self._follower is not None and now >= self._next_follow:
            self._next_follow = now + FOLLOW_INTERVAL_S
            found = self._follower.poll()
            if found is not None:
                log.info("definitions version %d (%s)", found.version, found.digest[:12])
                self._take(found.project)
        wanted = sorted(self._expected)
        if self._consumer is not None and not self._since_checkpoint and wanted != self._subscribed:
            if self._checkpoints is not None:
                self._consumer.subscribe(wanted, on_assign=self._checkpoints.on_assign)
            else:
                self._consumer.subscribe(wanted)
            self._subscribed = wanted
            log.info("judge consumes %s", ", ".join(wanted))

    # -- the Step protocol -----------------------------------------------------------------------------

    def handle(self, item: processor.Incoming) -> None:
        self._since_checkpoint = True
        self.clock_ms = max(self.clock_ms, item.timestamp_ms)
        self.read += 1
        v = item.value
        if item.record == "prediction":
            self._on_prediction(item)
        elif item.record == "model_version":
            self.version_seen(v)
        elif item.record == "deployment":
            self._on_deployment(v, item.timestamp_ms)
        else:
            self._on_label(item)

    def flush(self) -> bool:
        for held in self.held.expire(self.clock_ms, self.read):
            self._unknown_version(held, "not published since")
        for state in self.models.values():
            for reason, event_id, event in state.joins.expire():
                label = event.label
                assert label is not None
                if not state.served_near(event.first_ms):
                    self._not_served(state)
                    continue
                why = (
                    f"no prediction of event {event_id!r} within {state.joins.ttl_ms} ms"
                    if reason == "unknown_event"
                    else f"event {event_id!r} left the join unmatched: {state.joins.max_pending} events held"
                )
                BAD_RECORDS.labels(state.name, reason).inc()
                self._emitter.dead_letter(
                    DeadLetter(
                        stage=STEP_NAME,
                        error=f"{reason}: {why}",
                        error_type="StreamError",
                        key=label.key,
                        value=codec.encode(state.labels_source.name, label.raw, validate=False),
                        source_topic=label.topic,
                        partition=label.partition,
                        offset=label.offset,
                    )
                )
            clock = state.joins.prediction_clock
            if not state.served_near(clock):  # labels the predictions read have passed: none will meet them
                self._not_served(state, state.joins.drop_labels(clock))
            state.decide(self.clock_ms, self._settings.judge_verdict_every_s * 1000, self._emitter)
        self._flow_control(idle=False)
        self._poll_registry()
        return True

    def idle(self) -> bool:
        self._flow_control(idle=True)
        self._poll_registry()
        return False

    def waiting(self) -> dict[str, int]:
        """Topic -> the most records of it waiting for the other side of the join in one model's join,
        counting only the models served now (a model never scored holds no labels, and must not pause
        a topic other models read)."""
        load: dict[str, int] = {}
        predictions = topic(self._settings, "predictions")
        for state in self.models.values():
            if not state.served_near(state.joins.prediction_clock):
                continue
            labels, scored = state.joins.waiting()
            name = prefixed(self._settings, state.labels_source.topic_name)
            load[name] = max(load.get(name, 0), labels)
            load[predictions] = max(load.get(predictions, 0), scored)
        return load

    def _flow_control(self, *, idle: bool) -> None:
        """Keep the two sides of the join in step. A consumer catching up reads one topic far ahead of
        the other (the small label records, say), and what waits beyond ``judge_max_pending`` is lost:
        a topic with more than half of it waiting in a served model's join (:meth:`waiting`) is paused
        until it is below a quarter, and every topic is resumed when nothing else comes (labels of
        events never scored, predictions never labelled: they expire)."""
        if self._consumer is None:
            return
        load = self.waiting()
        limit = self._settings.judge_max_pending
        for name in sorted(set(load) | self._paused):
            count = load.get(name, 0)
            paused = name in self._paused
            if not paused and not idle and count > limit // 2:
                self._paused.add(name)
            elif paused and (idle or count < limit // 4):
                self._paused.discard(name)
            else:
                continue
            parts = [tp for tp in self._consumer.assignment() if tp.topic == name]
            if parts:
                (self._consumer.pause if name in self._paused else self._consumer.resume)(parts)
            log.log(
                logging.DEBUG if idle else logging.INFO,
                "%s %s (%d records waiting for the other side)",
                "paused" if name in self._paused else "resumed",
                name,
                count,
            )

    # -- state ---------------------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        self._since_checkpoint = False
        state = (
            self.clock_ms,
            self.models,
            self.versions,
            self.deployed,
            self.chains,
            self.held.held,
            self.read,
        )
        blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        if len(blob) > LARGE_STATE:
            log.warning("judge state is %d bytes: lower TIDE_JUDGE_MAX_PENDING", len(blob))
        return blob

    def restore(self, state: bytes) -> None:
        replayed, lineages = self.versions, self.chains
        loaded = pickle.loads(state)
        if len(loaded) == 4:  # a checkpoint from before lineages and held predictions
            loaded = (*loaded, {}, {}, 0)
        self.clock_ms, self.models, self.versions, self.deployed, self.chains, self.held.held, self.read = (
            loaded
        )
        for name, found in replayed.items():
            self.versions.setdefault(name, set()).update(found)
        for name, chains in lineages.items():
            mine = self.chains.setdefault(name, {})
            for version, chain in chains.items():
                mine.setdefault(version, chain)
        self._take(self._project)  # the definitions now in force, over the state's
        log.info(
            "restored: clock %d, %d models, %d candidates being judged",
            self.clock_ms,
            len(self.models),
            sum(len(s.judgements) for s in self.models.values()),
        )

    # -- records -------------------------------------------------------------------------------------------

    def version_seen(self, record: Mapping[str, Any]) -> None:
        """A ``model_version`` record: note the version and its lineage (:func:`streams.judging.chain_of`),
        and score the predictions of it read before it."""
        name, version = str(record["model"]), int(record["version"])
        self.versions.setdefault(name, set()).add(version)
        chains = self.chains.setdefault(name, {})
        if version not in chains:
            chains[version] = chain_of(record, chains)
        ready = self.held.release(name, version)
        if not ready:
            return
        log.info("model %s v%d published: %d predictions read before it scored", name, version, len(ready))
        state = self.models.get(name)
        if state is not None:
            for h in ready:
                self._score(state, h.value, h.timestamp_ms)

    def _hold(self, item: processor.Incoming) -> None:
        at = (item.key, item.topic, item.partition, item.offset)
        dropped = self.held.hold(Held(dict(item.value), item.timestamp_ms, self.read, *at))
        if dropped is not None:
            self._unknown_version(dropped, f"{self.held.max_held} predictions held")

    def _unknown_version(self, h: Held, why: str) -> None:
        name = h.model
        BAD_RECORDS.labels(name, "unknown_version").inc()
        try:
            value: bytes | None = codec.encode("prediction", h.value, validate=False)
        except (SchemaError, KeyError, TypeError, ValueError):
            value = None  # the letter still says where it was read
        self._emitter.dead_letter(
            DeadLetter(
                stage=STEP_NAME,
                error=f"unknown_version: model {name} v{h.version} was never published on the models topic "
                f"({why})",
                error_type="StreamError",
                key=h.key,
                value=value,
                source_topic=h.topic,
                partition=h.partition,
                offset=h.offset,
            )
        )

    def _not_served(self, state: ModelState, count: int = 1) -> None:
        if not count:
            return
        state.not_served += count
        IGNORED.labels(state.name, NOT_SERVED).inc(count)
        if state.not_served == count:
            log.info(
                "model %s: no prediction of it read near its labels' time; its labels are not held",
                state.name,
            )

    def _on_prediction(self, item: processor.Incoming) -> None:
        v, timestamp_ms = item.value, item.timestamp_ms
        for judged in self.models.values():
            judged.joins.predictions_at(timestamp_ms)
        name = str(v["model"])
        state = self.models.get(name)
        if state is None:
            return  # not a judged model
        state.served_ms = max(state.served_ms, timestamp_ms)
        if int(v["version"]) not in self.versions.get(name, ()):
            self._hold(item)  # its version's record may come next (module docstring)
            return
        self._score(state, v, timestamp_ms)

    def _score(self, state: ModelState, v: Mapping[str, Any], timestamp_ms: int) -> None:
        name = state.name
        event_id = v.get("event_id")
        arm = str(v["arm"])
        scored = Scored.of(state.task, v)
        state.observe(arm, scored, float(v.get("latency_ms") or 0.0), timestamp_ms)
        if event_id:  # joined even when not judged (a finished candidate's): its label is not unknown
            for joined in state.joins.prediction(str(event_id), scored, timestamp_ms):
                JOINED.labels(name, joined.arm).inc()
                state.joined(joined, self.clock_ms, self._emitter, self._chain(name, joined.version))

    def _chain(self, name: str, version: int) -> int:
        return self.chains.get(name, {}).get(version, version)

    def _on_label(self, item: processor.Incoming) -> None:
        v = item.value
        errors: list[str] = []
        for state in self.models.values():
            if state.labels_source.name != item.record:
                continue
            labels = state.labels
            raw_key, raw = v.get(labels.key), v.get(labels.target)
            try:
                if raw_key is None:
                    raise StreamError(f"missing_key: labels {labels.name!r} without {labels.key!r}")
                y = target(state.task, raw)
                if (
                    not state.served_near(item.timestamp_ms)
                    and state.joins.prediction_clock >= item.timestamp_ms
                ):
                    self._not_served(state)  # no prediction of it near this time, and none to come
                    continue
                seen = LabelSeen(y, dict(v), item.key, item.topic, item.partition, item.offset)
                for joined in state.joins.label(str(raw_key), seen, item.timestamp_ms):
                    JOINED.labels(state.name, joined.arm).inc()
                    state.joined(
                        joined, self.clock_ms, self._emitter, self._chain(state.name, joined.version)
                    )
            except StreamError as exc:
                BAD_RECORDS.labels(state.name, _reason(exc)).inc()
                errors.append(f"model {state.name}: {exc}")
        if errors:
            raise StreamError("; ".join(errors))

    def _on_deployment(self, v: Mapping[str, Any], published_ms: int) -> None:
        name, action, version = str(v["model"]), str(v["action"]), v.get("version")
        deployed = self.deployed.setdefault(name, {"canary": None, "shadow": None})
        ended: list[tuple[str, int]] = []
        started: list[tuple[str, int]] = []
        canary, shadow = deployed["canary"], deployed["shadow"]
        if action == "canary":
            weight = float(v.get("weight") or 0.0)
            new = int(version) if weight > 0 and version is not None else None
            if canary is not None and canary != new:
                ended.append(("canary", canary))
            if new is not None and new != canary:
                started.append(("canary", new))
            deployed["canary"] = new
        elif action in ("promote", "rollback"):
            if canary is not None and (action == "rollback" or canary == version):
                ended.append(("canary", canary))
                deployed["canary"] = None
        elif action == "shadow":
            new = int(version) if version is not None else None
            if shadow is not None and shadow != new:
                ended.append(("shadow", shadow))
            if new is not None and new != shadow:
                started.append(("shadow", new))
            deployed["shadow"] = new
        state = self.models.get(name)
        if state is None:
            return
        for arm, ver in ended:
            state.end(arm, ver, self.clock_ms, self._emitter)
        for arm, ver in started:
            state.restart(arm, ver, self.clock_ms, published_ms)
