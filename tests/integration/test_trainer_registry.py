"""The online trainer following the registry and the view versions made live, against the real broker and
Redis: a model applied while ``tide train`` runs is trained from history and published with its lineage;
a breaking change of a view starts a new lineage, replayed through the new version once it is live, while
the old lineage keeps publishing; a model whose views are not live waits; a removed model stops."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from examples.fraud.driver.generator import GeneratorConfig
from examples.fraud.fraud_model import new_model
from features.training import examples_for, read_source
from infra.settings import CommonSettings
from models.versions import read_versions
from online_training import trainer
from online_training.publish import latest_record
from online_training.settings import TrainerSettings
from schemas import registry
from schemas.definitions import Feature, Model, Project
from tests.integration.test_batch_retrain import produce_history
from tests.integration.test_trainer import VIEWS_V1, item, label, mark_live, prediction, step_of
from tests.integration.test_trainer import inputs as served_inputs
from tests.integration.test_trainer import trainer_settings as base_settings
from tide.plan import apply
from tide.processes import wait_until

pytestmark = pytest.mark.integration


def trainer_settings(settings: CommonSettings, **overrides: Any) -> TrainerSettings:
    """Labels here have no prediction: each is learnt from replayed features once its grace is over."""
    return base_settings(
        settings,
        **{
            "trainer_prediction_grace_s": 0.5,
            "trainer_catchup_interval_s": 0.2,
            "trainer_follow_interval_s": 0.2,
            **overrides,
        },
    )


def history(
    settings: CommonSettings, project: Project, n: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``n`` transactions and every one's label, produced; returns both."""
    return produce_history(
        settings, project, n, GeneratorConfig(cards=40, seed=seed, fraud_rate=0.2, label_delay=0)
    )


def with_models(project: Project, *models: Model, without: tuple[str, ...] = ()) -> Project:
    kept = {name: m for name, m in project.models.items() if name not in without}
    return dataclasses.replace(project, models={**kept, **{m.name: m for m in models}})


def lite(project: Project) -> Model:
    """A second river model of the fraud example on fewer inputs (one view)."""
    fraud = project.models["fraud"]
    return dataclasses.replace(
        fraud,
        name="fraud_lite",
        features=("card_activity.txn_count_1h", "card_activity.amount_mean_1h"),
        monitor=("amount",),
    )


def newest_of(settings: CommonSettings, model: str) -> dict[str, Any]:
    return latest_record(settings, model) or {}


class Trainer:
    """``trainer.run`` in a thread (``tide train`` in process); ``stop`` joins it, re-raising."""

    def __init__(self, settings: TrainerSettings, project: Project) -> None:
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(settings, project), daemon=True)

    def _run(self, settings: TrainerSettings, project: Project) -> None:
        try:
            trainer.run(settings, project, self.stop_event)
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive() and not self.errors, self.errors


@pytest.fixture
def running() -> Iterator[list[Trainer]]:
    started: list[Trainer] = []
    yield started
    for t in started:
        if t.thread.is_alive():
            t.stop()


def start(running: list[Trainer], settings: TrainerSettings, project: Project) -> Trainer:
    t = Trainer(settings, project)
    running.append(t)
    t.thread.start()
    return t


def test_a_model_applied_while_the_trainer_runs_is_trained_from_history_then_stops_when_removed(
    fraud: CommonSettings, fraud_project: Project, running: list[Trainer]
) -> None:
    s = trainer_settings(fraud)
    mark_live(s, fraud_project)
    _, labels = history(s, fraud_project, 300, seed=21)
    start(running, s, fraud_project)
    assert wait_until(lambda: newest_of(s, "fraud").get("trained_on") == len(labels), 30)

    added = with_models(fraud_project, lite(fraud_project))
    apply(s, added)
    applied = registry.latest(s)
    assert applied is not None and "fraud_lite" in applied.project.models
    # no restart: the running trainer replays history for it and publishes its first version
    assert wait_until(lambda: newest_of(s, "fraud_lite").get("trained_on") == len(labels), 30)
    first = newest_of(s, "fraud_lite")
    assert (first["version"], first["flavor"]) == (1, "river")
    assert first["view_versions"] == {"card_activity": 1}
    assert first["definitions_digest"] == applied.digest
    assert first["feature_names"] == ["amount", "category", "country", "card_present", *lite_features()]
    log = trainer.learn_log(s, "fraud_lite")
    assert len(log) == len(labels) and {e["path"] for e in log} == {"replayed"}
    # new labels reach both models, each learning them once
    _, more = history(s, fraud_project, 100, seed=22)
    total = len(labels) + len(more)
    assert wait_until(lambda: newest_of(s, "fraud_lite").get("trained_on") == total, 30)
    assert wait_until(lambda: newest_of(s, "fraud").get("trained_on") == total, 30)
    assert newest_of(s, "fraud")["definitions_digest"] == applied.digest  # the registry it runs now

    # removed (a breaking change): the trainer stops training it
    apply(s, fraud_project, allow_breaking=True)
    removed = registry.latest(s)
    assert removed is not None and "fraud_lite" not in removed.project.models
    stopped_at = newest_of(s, "fraud_lite")["version"]
    time.sleep(1.5)  # more than the follow interval: the removal is taken up
    _, last = history(s, fraud_project, 100, seed=23)
    total += len(last)
    assert wait_until(lambda: newest_of(s, "fraud").get("trained_on") == total, 30)
    assert newest_of(s, "fraud")["definitions_digest"] == removed.digest
    assert newest_of(s, "fraud_lite")["version"] == stopped_at
    assert len(trainer.learn_log(s, "fraud_lite")) < total


def lite_features() -> list[str]:
    return ["txn_count_1h", "amount_mean_1h"]


def test_a_breaking_view_change_starts_a_lineage_replayed_through_the_new_version_once_live(
    fraud: CommonSettings, fraud_project: Project, running: list[Trainer]
) -> None:
    s = trainer_settings(fraud)
    mark_live(s, fraud_project)
    _, labels = history(s, fraud_project, 400, seed=31)
    start(running, s, fraud_project)
    assert wait_until(lambda: newest_of(s, "fraud").get("trained_on") == len(labels), 30)
    assert newest_of(s, "fraud")["view_versions"] == VIEWS_V1

    # another aggregation: a breaking change, so the view gets a new version (v1 is kept for the models)
    activity = fraud_project.views["card_activity"]
    features = [
        Feature(a.name, "min", a.field) if a.name == "amount_max_1h" else a for a in activity.features
    ]
    changed = dataclasses.replace(
        fraud_project,
        views={**fraud_project.views, "card_activity": dataclasses.replace(activity, features=features)},
    )
    apply(s, changed, allow_breaking=True)
    applied = registry.latest(s)
    assert applied is not None
    v2 = applied.project.views["card_activity"]
    assert v2.version > 1 and "card_activity@1" in applied.project.previous_views

    # v2 is backfilling, not live: the model keeps its lineage and keeps publishing on v1
    _, more = history(s, fraud_project, 100, seed=32)
    total = len(labels) + len(more)
    assert wait_until(lambda: newest_of(s, "fraud").get("trained_on") == total, 30)
    on_v1 = newest_of(s, "fraud")
    assert on_v1["view_versions"] == VIEWS_V1 and on_v1["definitions_digest"] == applied.digest

    # v2 live: a new lineage replays history through v2 and takes over
    mark_live(s, applied.project, v2.ref)
    wanted = {**VIEWS_V1, "card_activity": v2.version}
    assert wait_until(lambda: newest_of(s, "fraud").get("view_versions") == wanted, 30)
    first = newest_of(s, "fraud")
    assert first["trained_on"] == total and first["version"] == on_v1["version"] + 1
    assert first["definitions_digest"] == applied.digest

    # trained by replay through v2's definition: it predicted, before learning each label, what bare
    # river predicts learning the v2 examples in order
    model = applied.project.models["fraud"]
    views = applied.project.model_views(model, wanted)
    replayed = examples_for(
        applied.project,
        model,
        read_source(s, model.request),
        read_source(s, model.labels.source),  # type: ignore[union-attr]
        views=views,
    )
    old = examples_for(
        applied.project,
        model,
        read_source(s, model.request),
        read_source(s, model.labels.source),  # type: ignore[union-attr]
        views=applied.project.model_views(model, VIEWS_V1),
    )
    assert [e.x["amount_max_1h"] for e in replayed] != [e.x["amount_max_1h"] for e in old]
    entries = [e for e in trainer.learn_log(s, "fraud") if e["version"] == first["version"]]
    assert [e["key"] for e in entries] == [str(e.key) for e in replayed]
    assert {e["path"] for e in entries} == {"replayed"}
    bare = new_model()
    for example, entry in zip(replayed, entries, strict=True):
        expected = bare.predict_proba_one(example.x)
        assert entry["y_pred"] == ({} if not expected else {str(k).lower(): v for k, v in expected.items()})
        bare.learn_one(example.x, example.y)

    # the new lineage goes on learning the stream, once
    _, last = history(s, fraud_project, 100, seed=33)
    total += len(last)
    assert wait_until(lambda: newest_of(s, "fraud").get("trained_on") == total, 30)
    assert newest_of(s, "fraud")["view_versions"] == wanted
    versions = [r for r in read_versions(s) if r["model"] == "fraud"]
    assert [r["version"] for r in versions] == list(range(1, len(versions) + 1))


def test_waits_for_live_views_and_learns_served_inputs_only_of_versions_that_fit(
    fraud: CommonSettings, fraud_project: Project
) -> None:
    s = trainer_settings(fraud, trainer_prediction_grace_s=3600)
    client = redis.Redis.from_url(s.redis_url)
    step = step_of(s, fraud_project, client)
    assert step.states == {} and latest_record(s, "fraud") is None  # no view is live yet: it waits
    mark_live(s, fraud_project, "card_activity@1", "card_daily@1")
    step.idle()
    assert step.states == {} and step.building == {}  # card_profile is not live yet
    mark_live(s, fraud_project)
    assert wait_until(lambda: (step.idle(), "fraud" in step.states)[1], 20, 0.1)
    state = step.states["fraud"]
    assert (state.online.version, state.binding.view_versions) == (1, VIEWS_V1)  # published, untrained
    # a prediction of an unknown version (or of other inputs) does not teach this lineage: its label
    # waits for a replay through the lineage's own view versions
    x = served_inputs(random.Random(3), True)
    step.handle(item("prediction", {**prediction("p1", x), "version": 99}))
    step.handle(item("prediction", prediction("p2", x)))  # version 1: this lineage's
    step.handle(item("chargebacks", label("p1", True)))
    step.handle(item("chargebacks", label("p2", True)))
    step.flush()
    assert [e["key"] for e in trainer.learn_log(s, "fraud")] == ["p2"]
    assert state.store.pending_count() == 1  # p1, due after its grace
    client.close()
