"""The blessing rule (TFX Evaluator's value and change thresholds), the champion, alert triggers and the
prequential comparison of online candidates."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from river import metrics

from models.base import Output
from online_training.blessing import Champions, as_prediction, bless, compare, is_blessed
from online_training.evaluation import build_metric, metric_value
from online_training.refresh import Pending, Seen, change_point, evaluate
from online_training.triggers import Triggers, alert_of, category, trigger_of
from schemas.definitions import Labels, Model, Source
from schemas.policy import Policy, Retrain


def rule(**kw: Any) -> Retrain:
    return Retrain(**kw)


def test_change_threshold_bigger_is_better() -> None:
    p = rule(max_regression=0.01)
    ok = bless(p, "ROCAUC", bigger_is_better=True, candidate=0.795, baseline=0.80, baseline_version=3)
    assert ok["blessed"] and ok["baseline_version"] == 3
    bad = bless(p, "ROCAUC", bigger_is_better=True, candidate=0.78, baseline=0.80, baseline_version=3)
    assert not bad["blessed"] and "change threshold" in bad["reason"] and "v3" in bad["reason"]
    assert bless(p, "ROCAUC", bigger_is_better=True, candidate=0.9, baseline=0.8, baseline_version=3)[
        "blessed"
    ]


def test_change_threshold_smaller_is_better() -> None:
    p = rule(max_regression=0.5)
    assert bless(p, "MAE", bigger_is_better=False, candidate=10.4, baseline=10.0, baseline_version=1)[
        "blessed"
    ]
    bad = bless(p, "MAE", bigger_is_better=False, candidate=10.6, baseline=10.0, baseline_version=1)
    assert not bad["blessed"] and "max_regression 0.5" in bad["reason"]
    assert bless(p, "MAE", bigger_is_better=False, candidate=3.0, baseline=10.0, baseline_version=1)[
        "blessed"
    ]


def test_zero_regression_allows_a_tie_only() -> None:
    p = rule()
    assert bless(p, "ROCAUC", bigger_is_better=True, candidate=0.8, baseline=0.8, baseline_version=1)[
        "blessed"
    ]
    assert not bless(p, "ROCAUC", bigger_is_better=True, candidate=0.7999, baseline=0.8, baseline_version=1)[
        "blessed"
    ]


def test_value_threshold_both_ways() -> None:
    up = rule(min_value=0.7)
    low = bless(up, "ROCAUC", bigger_is_better=True, candidate=0.65, baseline=0.5, baseline_version=2)
    assert not low["blessed"] and "value threshold" in low["reason"]  # better than the champion, still no
    assert bless(up, "ROCAUC", bigger_is_better=True, candidate=0.7)["blessed"]
    down = rule(min_value=5.0)  # an error: at most 5
    assert bless(down, "MAE", bigger_is_better=False, candidate=4.0)["blessed"]
    assert not bless(down, "MAE", bigger_is_better=False, candidate=6.0)["blessed"]


def test_no_champion() -> None:
    first = bless(rule(), "ROCAUC", bigger_is_better=True, candidate=0.55, window_labels=40)
    assert first["blessed"] and first["baseline_version"] is None and first["window_labels"] == 40
    untrained = bless(rule(), "ROCAUC", bigger_is_better=True, candidate=None)
    assert untrained["blessed"]  # a first, untrained version: serving can start
    assert not bless(rule(min_value=0.6), "ROCAUC", bigger_is_better=True, candidate=None)["blessed"]
    assert not bless(rule(min_value=0.6), "ROCAUC", bigger_is_better=True, candidate=0.59)["blessed"]


def test_unmeasured_candidate_or_champion() -> None:
    nothing = bless(rule(), "ROCAUC", bigger_is_better=True, candidate=None, baseline=0.8, baseline_version=4)
    assert not nothing["blessed"] and "could not be measured" in nothing["reason"]
    blind = bless(rule(), "ROCAUC", bigger_is_better=True, candidate=0.6, baseline=None, baseline_version=4)
    assert blind["blessed"] and "champion v4 could not be measured" in blind["reason"]


def test_champion_is_the_newest_blessed() -> None:
    champions = Champions()
    verdict = {"blessed": False, "reason": "x", "metric": "ROCAUC"}
    champions.seen({"model": "m", "version": 1, "blessing": None})  # older than blessing: blessed
    champions.seen({"model": "m", "version": 3, "blessing": verdict})
    assert champions.version("m") == 1
    champions.seen({"model": "m", "version": 2, "blessing": {**verdict, "blessed": True}})
    assert champions.version("m") == 2 and champions.version("other") is None
    assert is_blessed({"blessing": None}) and not is_blessed({"blessing": verdict})


def model_with(metric: str, task: str = "binary", **retrain: Any) -> Model:
    schema = {
        "type": "record",
        "name": "Ev",
        "fields": [
            {"name": "k", "type": "string"},
            {"name": "a", "type": "double"},
            {"name": "ts", "type": "long"},
        ],
    }
    request = Source(name="ev", topic="ev", schema=schema, key="k", event_time="ts")
    labels_schema = {
        "type": "record",
        "name": "Lab",
        "fields": [
            {"name": "k", "type": "string"},
            {"name": "y", "type": "boolean"},
            {"name": "ts", "type": "long"},
        ],
    }
    labels = Labels(
        name="lab",
        source=Source(name="lab", topic="lab", schema=labels_schema, key="k", event_time="ts"),
        key="k",
        target="y",
        task=task,  # type: ignore[arg-type]
    )
    return Model(
        name="m",
        task=task,  # type: ignore[arg-type]
        request=request,
        request_fields=["a"],
        labels=labels,
        learner="river.linear_model:LogisticRegression",
        metric=metric,
        policy=Policy(retrain=Retrain(**retrain)),
    )


def test_compare_uses_the_same_examples_for_both() -> None:
    model = model_with("Accuracy", max_regression=0.0)
    ys = [True, False, True, False]
    ours: list[Any] = [True, False, None, False]  # Accuracy is fed labels
    theirs: list[Any] = [False, False, True, True]
    verdict = compare(model, ys, ours, theirs, 7)
    # the third example is left out on both sides (the candidate predicted nothing)
    assert verdict["window_labels"] == 3
    assert verdict["candidate_value"] == pytest.approx(1.0) and verdict["baseline_value"] == pytest.approx(
        1 / 3
    )
    assert verdict["blessed"]
    worse = compare(model, ys, theirs, ours, 7)
    assert not worse["blessed"] and worse["metric"] == "Accuracy"


@pytest.mark.parametrize("metric", ["ROCAUC", "LogLoss"])
def test_predictions_both_sides_share_count_once_and_give_each_side_its_whole_metric(metric: str) -> None:
    import random

    model = model_with(metric, max_regression=0.0)
    rng = random.Random(3)
    ys = [rng.random() < 0.4 for _ in range(300)]
    ours: list[Any] = [{True: p, False: 1 - p} for p in (rng.random() for _ in ys)]
    theirs: list[Any] = [
        mine if i < 200 else {True: p, False: 1 - p}  # the lineage's own predictions, then the champion's
        for i, (mine, p) in enumerate(zip(ours, (rng.random() for _ in ys), strict=True))
    ]
    verdict = compare(model, ys, ours, theirs, 4)
    assert verdict["candidate_value"] == pytest.approx(metric_value(build_metric(model), ys, ours))
    assert verdict["baseline_value"] == pytest.approx(metric_value(build_metric(model), ys, theirs))
    assert verdict["candidate_value"] != pytest.approx(verdict["baseline_value"])


def test_runtime_answers_feed_the_metric_like_a_learner() -> None:
    assert as_prediction("binary", Output(0.7)) == {True: 0.7, False: pytest.approx(0.3)}
    assert as_prediction("binary", Output(0.7), labels_only=True) is True
    assert as_prediction("regression", Output(3.5)) == 3.5
    multi = Output(0.6, "b", {"a": 0.4, "b": 0.6})
    assert as_prediction("multiclass", multi) == {"a": 0.4, "b": 0.6}
    assert as_prediction("multiclass", multi, labels_only=True) == "b"


class Scorer:
    """A champion that always says ``p`` (and records what it was asked)."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.asked: list[dict[str, Any]] = []

    def predictions(self, project: Any, model: Any, record: Any, xs: list[dict[str, Any]]) -> list[Any]:
        self.asked += xs
        return [self.p >= 0.5 for _ in xs]


def test_prequential_window_uses_the_lineage_for_what_the_champion_learnt() -> None:
    model = model_with("Accuracy")
    right, wrong = True, False  # Accuracy is fed labels
    window = [Seen(str(i), {"a": float(i)}, True, i, 1 + i // 2, right if i < 2 else wrong) for i in range(4)]
    champion = {"model": "m", "version": 1}
    scorer = Scorer(0.9)  # the frozen champion is right on everything
    candidate = [s.y_pred for s in window]
    same = evaluate(None, model, window, candidate, champion, scorer, same_lineage=True)  # type: ignore[arg-type]
    # examples 0 and 1 went into version 1 (the champion): its lineage's predictions; 2 and 3 after it
    assert [x["a"] for x in scorer.asked] == [2.0, 3.0]
    assert same["baseline_value"] == pytest.approx(1.0) and same["candidate_value"] == pytest.approx(0.5)
    assert not same["blessed"] and same["baseline_version"] == 1
    other = evaluate(None, model, window, candidate, champion, Scorer(0.9), same_lineage=False)  # type: ignore[arg-type]
    assert other["window_labels"] == 4 and other["baseline_value"] == pytest.approx(1.0)
    alone = evaluate(None, model, window, candidate, None, scorer, same_lineage=False)  # type: ignore[arg-type]
    assert alone["blessed"] and alone["baseline_version"] is None


def test_alert_triggers_policy_rate_limit_and_once() -> None:
    model = model_with("ROCAUC", on=("concept",), min_interval_s=60)
    triggers = Triggers()
    concept = {"alert_id": "a1", "model": "m", "version": 3, "kind": "concept"}
    drift = {"alert_id": "a2", "model": "m", "version": 3, "kind": "input"}
    assert category("output") == "drift" and category("concept") == "concept"
    assert not triggers.wanted(model, drift, 0)  # not in `on`
    assert triggers.wanted(model, concept, 1_000_000)
    triggers.acting("m", concept, 1_000_000)
    assert not triggers.wanted(model, concept, 9_000_000)  # acted on already
    later = {**concept, "alert_id": "a3"}
    assert not triggers.wanted(model, later, 1_030_000)  # within min_interval_s
    assert triggers.wanted(model, later, 1_061_000)
    # what a version's trigger says is enough to know, after a restart
    fresh = Triggers()
    fresh.seen({"model": "m", "version": 4, "trigger": trigger_of(concept), "created_ts": 1_000_000})
    assert alert_of(trigger_of(concept)) == "a1" and alert_of("schedule") is None
    assert not fresh.wanted(model, concept, 5_000_000) and not fresh.wanted(model, later, 1_010_000)


def test_a_concept_alert_places_its_change_point_in_the_lineage_count() -> None:
    window = [Seen(f"e{i}", {"a": 1.0}, True, i, 1) for i in range(100)]  # labels 901..1000 of a lineage
    concept = {"alert_id": "a1", "kind": "concept", "delay_records": 30, "trigger_event_id": "e89"}
    # anchored at the alert's own label (the 990th: the lineage learnt 10 more since), 30 labels back
    assert change_point(concept, window, 1000) == 960
    # its label not learnt (yet): anchored at the newest label learnt
    assert change_point({**concept, "trigger_event_id": "x"}, window, 1000) == 970
    assert change_point({**concept, "trigger_event_id": None}, window, 1000) == 970
    assert change_point({**concept, "delay_records": 5000}, window, 1000) == 0
    # no change point among the labels: refreshed at once on the whole window
    assert change_point({**concept, "delay_records": None}, window, 1000) is None
    assert change_point({**concept, "kind": "input"}, window, 1000) is None
    assert change_point({"alert_id": "a2", "kind": "concept"}, window, 1000) is None


def test_a_pending_refresh_counts_labels_of_its_lineage_and_round_trips() -> None:
    waiting = Pending({"alert_id": "a1", "kind": "concept", "delay_records": 30}, "f.1", 960, 5)
    assert waiting.since("f.1", 1000) == 40 and waiting.since("f.1", 900) == 0
    assert waiting.since("f.2", 1000) is None  # another lineage's count is not this one's
    assert Pending.loads(Pending.dumps({"m": waiting})) == {"m": waiting}
    assert Pending.loads(Pending.dumps({})) == {}


def test_the_blessing_is_signed() -> None:
    from models.signing import statement

    rec = {"model": "m", "version": 2, "flavor": "river", "sha256": "ab", "feature_names": ["a"]}
    assert statement({**rec, "blessing": None}) == statement(rec)  # older records: as they were
    verdict = {"blessed": False, "reason": "x", "metric": "ROCAUC"}
    unblessed = statement({**rec, "blessing": verdict})
    assert b'"blessed":false' in unblessed
    assert unblessed != statement({**rec, "blessing": {**verdict, "blessed": True}})


@pytest.mark.parametrize("name", ["ROCAUC", "MAE", "MSE", "RMSE", "LogLoss", "Accuracy", "F1"])
def test_a_windows_metric_is_what_river_gives_fed_pair_by_pair(name: str) -> None:
    rng = np.random.default_rng(3)
    regression = name in ("MAE", "MSE", "RMSE")
    if regression:
        ys: list[Any] = [float(v) for v in rng.normal(10, 3, 2000)]
        preds: list[Any] = [float(y + e) for y, e in zip(ys, rng.normal(0, 2, 2000), strict=True)]
    else:
        ys = [bool(v) for v in rng.random(2000) < 0.2]
        preds = [{True: float(p), False: 1 - float(p)} for p in rng.beta(2, 5, 2000)]
        if name in ("Accuracy", "F1"):
            preds = [p[True] >= 0.5 for p in preds]
        preds[:3] = [None, {}, None]  # a learner that had learnt nothing: not fed
    river_metric = getattr(metrics, name)()
    for y, p in zip(ys, preds, strict=True):
        if p is not None and p != {}:
            river_metric.update(y, p)
    got = metric_value(getattr(metrics, name)(), ys, preds)
    if name == "ROCAUC":
        assert got == river_metric.get()  # the very same thresholds and sums
    else:
        assert got == pytest.approx(river_metric.get(), rel=1e-12)
    if not regression:
        assert metric_value(getattr(metrics, name)(), ys[:3], preds[:3]) is None  # nothing fed
