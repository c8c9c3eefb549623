"""The drift scorer: each model's live inputs and output compared with its version's reference profile.

The scorer watches every model of the project (its definitions from the registry, passed down from the
entry point). Each model version may carry a reference profile (:mod:`models.profile`): a histogram per
numeric input, value counts per categorical or binary input, a histogram of its scores and, for a
multiclass model, counts of its predicted labels. What is watched per model (:func:`watched`):

- the inputs its definition names in ``monitor``, each with the test its type calls for
  (:mod:`streams.drift_tests`: PSI and KS for numeric, chi-square for categorical, Fisher's exact test of
  two proportions for binary), the type read from the reference (histogram or counts);
- its output, under :data:`models.profile.SCORE`: the ``score`` for binary and regression models (a
  numeric test), the predicted ``label`` for multiclass models (a categorical test; a reference without
  label counts falls back to the score, the top-class confidence).

Every threshold is calibrated on the reference for the model's ``policy.drift.false_alarm_rate`` per
check. Each champion prediction pushes its inputs into the model's input windows and its output into its
version's output window; every ``drift_check_every`` predictions compared, each full window is tested
against the reference *of the version that served the prediction*. A version without a reference is not
compared with any other version's (its predictions are counted and its inputs still fill the windows).
A test that fires raises one :class:`~schemas.records.DriftAlert` (v2: kind, feature type, statistic,
p-value, rate, estimates) and disarms that (version, name) until ``policy.drift.cooldown_checks`` checks
in a row are calm (below the critical value at the rate ``rate ** drift_rearm_ratio``). Every check also
appends a compact stats point to the Redis stream ``{topic_prefix}tide:drift:{model}`` for dashboards.

Exactly once: alerts are produced in the processor's Kafka transaction, and the step's whole state
(:mod:`streams.drift_state`: windows, alarms, counters) is checkpointed in the same transaction
(:mod:`schemas.checkpoints`), so a scorer killed and restarted resumes where its last committed output
left it: no alert is repeated or lost. Alert ids are derived from (model, version, name, check number),
so a consumer can also deduplicate. Stats points are best-effort and may repeat after a crash. The
service that runs the step is :mod:`streams.drift_service`.

The scorer follows the registry while it runs (:class:`schemas.registry.Follower`, polled between
batches): a model added is watched from its next version on (a version seen before its model was
known is kept aside and taken up when it is), a removed model is dropped, and a model whose monitored
inputs or drift policy change is tested afresh.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from prometheus_client import Counter, Gauge
from pydantic import Field

from infra import processor
from infra.errors import StreamError
from infra.settings import CommonSettings
from models.profile import LABEL, SCORE
from schemas import codec, registry
from schemas.definitions import Model, Project
from schemas.records import CategoryCounts, DriftAlert, Histogram
from streams import drift_tests
from streams.drift_state import DriftState, ModelWindows
from streams.drift_tests import DriftTest, Outcome

log = logging.getLogger(__name__)

STEP_NAME = "drift"
STATS_KEY_PREFIX = "tide:drift:"
STATS_MAXLEN = 10_000
# Bounds on per-model state: references of old versions (their alarms go with them) and built tests.
REFERENCES_PER_MODEL = 256
TESTS_PER_MODEL = 8
UNKNOWN_KEPT = 4  # versions kept per model not (yet) in the definitions, newest first
FOLLOW_INTERVAL_S = 0.5  # how often the registry is looked at
ARM = "champion"  # the arm whose predictions are compared
ALERT_NAMESPACE = uuid.UUID("6f1d2c52-5b8e-4f2a-9d0c-2a7f4e1b9c10")

DRIFT_STATISTIC = Gauge(
    "tide_drift_statistic",
    "Deciding drift statistic of the live window against the reference, at the last check",
    ["model", "feature"],
)
DRIFT_ALERTS = Counter("tide_drift_alerts_total", "Drift alerts raised", ["model", "feature"])
UNREFERENCED = Counter(
    "tide_drift_unreferenced_total",
    "Champion predictions of a version without a reference profile (not compared)",
    ["model"],
)

StatsFields = dict[str, str | int | float]
StatsPoint = tuple[str, StatsFields]  # (model, fields)
StatsSink = Callable[[Sequence[StatsPoint]], None]


class DriftSettings(CommonSettings):
    """Settings of the drift scorer (``TIDE_DRIFT_*``). Thresholds come from each model's
    ``policy.drift`` (false-alarm rate, cool-down); ``drift_psi_threshold``, when set, is a floor under
    the calibrated PSI threshold (an effect size below which PSI never alerts)."""

    drift_window: int = Field(default=500, ge=10)  # live values compared with the reference
    drift_check_every: int = Field(default=50, ge=1)  # predictions between two checks
    drift_psi_threshold: float | None = Field(default=None, gt=0)
    drift_rearm_ratio: float = Field(default=0.5, ge=0, le=1)
    drift_group: str = Field(default="tide-drift", pattern=r"^[A-Za-z0-9._-]+$")
    drift_min_reference: int = Field(default=1000, ge=1)  # smaller reference profiles are ignored
    drift_checkpoint_interval_s: float = Field(default=1.0, ge=0)  # at most one checkpoint per interval


class AlertProducer(Protocol):
    """What the step needs of a producer (a confluent-kafka ``Producer`` in a transaction)."""

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> None: ...


@dataclass(frozen=True)
class Reference:
    """A model version's reference profile: histograms and value counts by name (the output's score
    histogram under ``SCORE``, a multiclass model's label counts under ``LABEL``)."""

    model: str
    version: int
    size: int
    histograms: dict[str, Histogram]
    categories: dict[str, CategoryCounts] = field(default_factory=dict)

    @classmethod
    def from_model_version(cls, record: Mapping[str, Any]) -> Reference | None:
        profile = record.get("reference")
        if profile is None:
            return None
        hists: list[Histogram] = list(profile["features"])
        if profile.get("prediction") is not None:
            score = profile["prediction"]
            hists.append(Histogram(name=SCORE, edges=score["edges"], counts=score["counts"]))
        cats: list[CategoryCounts] = list(profile.get("categories") or [])
        names = [h["name"] for h in hists] + [c["name"] for c in cats]
        if len(set(names)) != len(names):
            raise StreamError(f"reference of {record['model']} v{record['version']} repeats a name")
        return cls(
            record["model"],
            int(record["version"]),
            int(profile["size"]),
            {h["name"]: h for h in hists},
            {c["name"]: c for c in cats},
        )


@dataclass
class _ModelState:
    references: dict[int, Reference] = field(default_factory=dict)
    tests: dict[int, dict[str, DriftTest]] = field(default_factory=dict)  # by version, built on first use


def stats_key(model: str, namespace: str = "") -> str:
    """The Redis stream holding ``model``'s drift stats points (``namespace``: the topic prefix)."""
    return f"{namespace}{STATS_KEY_PREFIX}{model}"


class RedisStatsSink:
    """Appends stats points to ``{namespace}tide:drift:{model}`` streams (XADD, MAXLEN ~), one pipeline per
    batch. Stats are for dashboards: a failed write is logged and dropped rather than stopping the scorer.
    """

    def __init__(self, client: redis.Redis, *, namespace: str = "", maxlen: int = STATS_MAXLEN) -> None:
        self._client = client
        self._namespace = namespace
        self._maxlen = maxlen

    def __call__(self, points: Sequence[StatsPoint]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for model, fields in points:
            entry: dict[Any, Any] = dict(fields)
            pipe.xadd(stats_key(model, self._namespace), entry, maxlen=self._maxlen, approximate=True)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("dropped %d drift stats points: %s", len(points), exc)


def watched(model: Model) -> tuple[str, ...]:
    """What the scorer compares for ``model``: its monitored inputs, then its output (:data:`SCORE`)."""
    return (*model.monitor, SCORE)


def output_value(record: Mapping[str, Any], test: DriftTest) -> Any:
    """The output of a prediction as its test takes it: the predicted ``label`` for a categorical test (a
    multiclass model with label counts), else the ``score``."""
    return record.get("label") if test.feature_type == drift_tests.CATEGORICAL else record["score"]


class DriftStep:
    """Stream step ``drift``: model versions set references, champion predictions feed the windows.

    Only the models of ``project`` are watched, each on :func:`watched`. A prediction is compared with
    its own version's reference only. Alerts are produced as ``drift_alert`` records to ``alerts_topic``.
    Implements :class:`infra.processor.Stateful` (its windows and alarms are checkpointed).
    """

    name = STEP_NAME

    def __init__(
        self,
        settings: DriftSettings,
        project: Project,
        producer: AlertProducer,
        alerts_topic: str,
        stats_sink: StatsSink | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._definitions: Mapping[str, Model] = project.models
        self._unknown: dict[str, dict[int, Mapping[str, Any]]] = {}  # model -> version -> record
        self._follower: registry.Follower | None = None
        self._next_follow = 0.0
        self._logged: set[tuple[str, int, str]] = set()  # (model, version, what) logged once
        self._producer = producer
        self._alerts_topic = alerts_topic
        self._stats_sink = stats_sink
        self._clock = clock
        self._models: dict[str, _ModelState] = {}
        self._state = DriftState(settings.drift_window)
        self._points: list[StatsPoint] = []

    # -- inspection (tests, logs) --------------------------------------------------------------------

    def reference(self, model: str, version: int | None = None) -> Reference | None:
        """The stored reference of ``model`` at ``version``, or its latest when ``version`` is None."""
        state = self._models.get(model)
        if state is None or not state.references:
            return None
        return state.references[max(state.references)] if version is None else state.references.get(version)

    def windows(self, model: str) -> ModelWindows | None:
        return self._state.models.get(model)

    # -- Step and Stateful protocols -----------------------------------------------------------------

    def handle(self, item: processor.Incoming) -> None:
        if item.record == "prediction":
            self._on_prediction(item.value)
        elif item.record == "model_version":
            self.version_seen(item.value)
        else:
            raise StreamError(f"drift step does not take {item.record} records")

    def flush(self) -> bool:
        if self._points:
            if self._stats_sink is not None:
                self._stats_sink(self._points)
            self._points = []
        self._poll_registry()
        return True  # checkpoint every batch (at most once per drift_checkpoint_interval_s)

    def idle(self) -> bool:
        self._poll_registry()
        return False  # nothing is produced without input

    def snapshot(self) -> bytes:
        return self._state.snapshot()

    def restore(self, state: bytes) -> None:
        self._state.restore(state)
        log.info("restored drift windows and alarms of %d models", len(self._state.models))

    # -- definitions -----------------------------------------------------------------------------------

    def follow(self, follower: registry.Follower | None) -> None:
        """Take newer definitions from ``follower`` between batches."""
        self._follower = follower

    def _poll_registry(self) -> None:
        now = time.monotonic()
        if self._follower is None or now < self._next_follow:
            return
        self._next_follow = now + FOLLOW_INTERVAL_S
        found = self._follower.poll()
        if found is not None:
            log.info("definitions version %d (%s)", found.version, found.digest[:12])
            self.update(found.project)

    def update(self, project: Project) -> None:
        """Watch the models of ``project`` from now on: new ones (with the versions of them seen while
        they were unknown), not removed ones; a model whose watched inputs or drift policy changed has its
        tests built afresh."""
        before, self._definitions = self._definitions, project.models
        for name in set(before) - set(project.models):
            self._models.pop(name, None)
            self._state.models.pop(name, None)
            log.info("model %s is no longer a model of the project: not watched any more", name)
        for name, model in project.models.items():
            if name not in before:
                log.info("watching model %s", name)
                for _, record in sorted(self._unknown.pop(name, {}).items()):
                    self.version_seen(record)
            elif (watched(before[name]), before[name].policy.drift) != (watched(model), model.policy.drift):
                if name in self._models:
                    self._models[name].tests.clear()  # rebuilt on the next prediction
                if name in self._state.models:
                    self._state.models[name].keep_inputs(set(model.monitor))
                log.info("model %s: watching %s", name, ", ".join(watched(model)))

    # -- records ---------------------------------------------------------------------------------------

    def version_seen(self, record: Mapping[str, Any]) -> None:
        """A ``model_version`` record (read by the step, or replayed when the scorer starts)."""
        if record["model"] not in self._definitions:
            # Perhaps of a model applied a moment ago, whose definitions this scorer has not read yet.
            log.debug("model %s v%s is not a model of the project", record["model"], record["version"])
            kept = self._unknown.setdefault(str(record["model"]), {})
            kept[int(record["version"])] = record
            for old in sorted(kept)[:-UNKNOWN_KEPT]:
                del kept[old]
            return
        ref = Reference.from_model_version(record)
        if ref is None:
            log.debug("model %s v%s has no reference profile", record["model"], record["version"])
            return
        if ref.size < self._settings.drift_min_reference:
            log.info(
                "ignoring reference of model %s v%d: %d examples < %d",
                ref.model,
                ref.version,
                ref.size,
                self._settings.drift_min_reference,
            )
            return
        state = self._models.setdefault(ref.model, _ModelState())
        if state.references.get(ref.version) == ref:
            return  # a replay of what we hold
        tests = self._build(ref)  # validates every histogram and count before anything is stored
        state.references[ref.version] = ref
        state.tests.pop(ref.version, None)
        state.tests[ref.version] = tests
        self._bound(ref.model, state)
        log.info(
            "reference of model %s v%d: %d examples, histograms %s, counts %s",
            ref.model,
            ref.version,
            ref.size,
            sorted(ref.histograms),
            sorted(ref.categories),
        )

    def _bound(self, model: str, state: _ModelState) -> None:
        while len(state.references) > REFERENCES_PER_MODEL:
            oldest = min(state.references)
            del state.references[oldest]
            state.tests.pop(oldest, None)
            if model in self._state.models:
                self._state.models[model].forget(oldest)
        while len(state.tests) > TESTS_PER_MODEL:
            del state.tests[next(iter(state.tests))]

    def _build(self, ref: Reference) -> dict[str, DriftTest]:
        """The tests of what the model watches, by the type its reference gives each."""
        s = self._settings
        model = self._definitions[ref.model]
        rate, window, ratio = model.policy.drift.false_alarm_rate, s.drift_window, s.drift_rearm_ratio
        tests: dict[str, DriftTest] = {}
        missing = []
        for name in watched(model):
            counts = ref.categories.get(LABEL if name == SCORE else name)
            if counts is not None and (name != SCORE or model.task == "multiclass"):
                tests[name] = drift_tests.for_counts(counts, window, rate, ratio)
            elif name in ref.histograms:
                tests[name] = drift_tests.for_histogram(
                    ref.histograms[name], window, rate, ratio, s.drift_psi_threshold
                )
            else:
                missing.append(name)
        if missing:
            self._log_once(
                ref.model,
                ref.version,
                "missing",
                "model %s v%d: the reference profile has nothing of %s; not watched",
                ", ".join(missing),
            )
        return tests

    def _log_once(self, model: str, version: int, what: str, msg: str, *args: object) -> None:
        if (model, version, what) not in self._logged:
            self._logged.add((model, version, what))
            log.warning(msg, model, version, *args)

    def _tests_for(self, model: str, version: int) -> dict[str, DriftTest] | None:
        state = self._models.get(model)
        ref = state.references.get(version) if state is not None else None
        if state is None or ref is None:
            return None
        tests = state.tests.pop(version, None)
        if tests is None:
            tests = self._build(ref)
        state.tests[version] = tests  # the most recently used last
        self._bound(model, state)
        return tests

    def _on_prediction(self, record: Mapping[str, Any]) -> None:
        if record["arm"] != ARM or record["model"] not in self._definitions:
            return
        model, version = str(record["model"]), int(record["version"])
        definition = self._definitions[model]
        tests = self._tests_for(model, version)
        inputs = record["features"]
        if tests is not None:
            # Check every value's type first: a bad value must not update half the windows.
            for name, test in tests.items():
                raw = output_value(record, test) if name == SCORE else inputs.get(name)
                try:
                    test.convert(raw)
                except (TypeError, ValueError):
                    raise StreamError(
                        f"model {model} v{version}: {name!r} is not {test.feature_type}: {raw!r}"
                    ) from None
        windows = self._state.of(model)
        windows.push_inputs({name: inputs.get(name) for name in definition.monitor})
        if tests is None:
            UNREFERENCED.labels(model).inc()
            self._log_once(
                model,
                version,
                "unreferenced",
                "model %s v%d has no reference profile: its predictions are %s",
                "not compared with any other version's",
            )
            return
        if SCORE in tests:
            windows.push_output(version, output_value(record, tests[SCORE]))
        windows.seen += 1
        if windows.seen % self._settings.drift_check_every == 0:
            self._check(model, version, tests, windows, record)

    def _check(
        self,
        model: str,
        version: int,
        tests: Mapping[str, DriftTest],
        windows: ModelWindows,
        record: Mapping[str, Any],
    ) -> None:
        ref = self._models[model].references[version]
        policy = self._definitions[model].policy.drift
        windows.checks += 1
        now_ms = int(self._clock() * 1000)
        event_id: str | None = record.get("event_id")
        point: StatsFields = {"ts": now_ms, "version": version, "trigger_event_id": event_id or ""}
        for name, test in tests.items():
            window = windows.outputs.get(version) if name == SCORE else windows.inputs.get(name)
            if window is None or len(window) < self._settings.drift_window:
                continue  # a part-filled window's statistic is mostly sampling noise
            outcome = test.evaluate([test.convert(v) for v in window])
            DRIFT_STATISTIC.labels(model, name).set(outcome.value)
            point[name] = outcome.value
            if windows.alarm(version, name).step(outcome.fired, outcome.calm, policy.cooldown_checks):
                self._alert(ref, name, test, outcome, windows.checks, event_id, now_ms)
        self._points.append((model, point))

    def _alert(
        self,
        ref: Reference,
        name: str,
        test: DriftTest,
        outcome: Outcome,
        check: int,
        event_id: str | None,
        now_ms: int,
    ) -> None:
        model = self._definitions[ref.model]
        output = name == SCORE
        alert: DriftAlert = {
            "alert_id": uuid.uuid5(ALERT_NAMESPACE, f"{ref.model}/{ref.version}/{name}/{check}").hex,
            "model": ref.model,
            "version": ref.version,
            "feature": name,
            "statistic": outcome.statistic,
            "value": outcome.value,
            "threshold": outcome.threshold,
            "window_size": self._settings.drift_window,
            "reference_size": ref.size,
            "trigger_event_id": event_id,
            "kind": "output" if output else "input",
            "feature_type": model.task if output else test.feature_type,
            "p_value": outcome.p_value,
            "false_alarm_rate": model.policy.drift.false_alarm_rate,
            "estimate_before": outcome.estimate_before,
            "estimate_after": outcome.estimate_after,
            "delay_records": None,
            "arm": ARM,
            "ts": now_ms,
        }
        self._producer.produce(
            self._alerts_topic, value=codec.encode("drift_alert", alert), key=ref.model.encode()
        )
        DRIFT_ALERTS.labels(ref.model, name).inc()
        log.warning(
            "drift alert %s: model %s v%d %s %s (%s) %s %.4g > %.4g (p %s, window %d, trigger event %s)",
            alert["alert_id"],
            ref.model,
            ref.version,
            alert["kind"],
            name,
            alert["feature_type"],
            outcome.statistic,
            outcome.value,
            outcome.threshold,
            "n/a" if outcome.p_value is None else f"{outcome.p_value:.3g}",
            self._settings.drift_window,
            event_id,
        )
