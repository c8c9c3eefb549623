"""Tide's online trainer learns exactly as bare river does.

Small projects declared by the tests (their own Avro schemas, labels and river learners) stream river's
bundled datasets through Tide's topics: events to the source's topic, labels to the labels' topic, no
serving (so every event is one that was never scored, and the trainer learns it from point-in-time
replayed features). The trainer's progressive predictions, read from its learn log, must be identical
(bit for bit) to ``river.evaluate.iter_progressive_val_score`` over the same stream, or to the same
predict-then-learn loop in the order the trainer recorded when several partitions interleave.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from river import datasets, evaluate, metrics

from infra.imports import add_code_path
from infra.settings import CommonSettings
from online_training import trainer
from online_training.publish import latest_record
from online_training.settings import TrainerSettings
from schemas.definitions import Project
from schemas.registry import register_schemas
from tests.integration.test_trainer import mark_live
from tide import Client
from tide.plan import apply
from tide.processes import wait_until
from tide.project import load_project

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000  # event times: fixed, in the past
DAY = 86_400_000
PHISHING_FIELDS = list(next(iter(datasets.Phishing()))[0])


def avro(name: str, fields: dict[str, str]) -> str:
    return json.dumps(
        {"type": "record", "name": name, "fields": [{"name": k, "type": t} for k, t in fields.items()]},
        indent=1,
    )


def write_project(root: Path, files: dict[str, str]) -> Project:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return load_project(root)


def phishing_project(root: Path, partitions: int) -> Project:
    page = {
        f: ("long" if isinstance(v, int) else "double") for f, v in next(iter(datasets.Phishing()))[0].items()
    }
    return write_project(
        root,
        {
            "schemas/page.avsc": avro("Page", {"event_id": "string", **page, "ts": "long"}),
            "schemas/verdict.avsc": avro(
                "Verdict", {"event_id": "string", "is_phishing": "boolean", "ts": "long"}
            ),
            "phishing_model.py": """
                from river import linear_model, preprocessing


                def new_model():
                    return preprocessing.StandardScaler() | linear_model.LogisticRegression()
                """,
            "definitions.py": f"""
                from tide import Labels, Model, Source

                PROJECT_NAME = "phishing"
                parts = {partitions}
                pages = Source("pages", "schemas/page.avsc", "event_id", "ts", partitions=parts)
                verdicts = Source("verdicts", "schemas/verdict.avsc", "event_id", "ts", partitions=parts)
                is_phishing = Labels(
                    "is_phishing", verdicts, key="event_id", target="is_phishing", task="binary"
                )
                phishing = Model(
                    "phishing",
                    task="binary",
                    request=pages,
                    request_fields={PHISHING_FIELDS!r},
                    labels=is_phishing,
                    learner="phishing_model:new_model",
                    metric="ROCAUC",
                    publish_every=300,
                    monitor=["is_popular", "age_of_domain"],
                )
                """,
        },
    )


def chick_project(root: Path) -> Project:
    return write_project(
        root,
        {
            "schemas/weighing.avsc": avro(
                "Weighing",
                {"event_id": "string", "chick": "long", "diet": "long", "time": "long", "ts": "long"},
            ),
            "schemas/weight.avsc": avro(
                "Weight", {"event_id": "string", "chick": "long", "weight": "double", "ts": "long"}
            ),
            "chick_model.py": """
                from river import compose, linear_model, preprocessing


                def known(x):
                    return {k: 0.0 if v is None else v for k, v in x.items()}


                def new_model():
                    return (
                        compose.FuncTransformer(known)
                        | preprocessing.StandardScaler()
                        | linear_model.LinearRegression(intercept_lr=0.1)
                    )
                """,
            "definitions.py": """
                from tide import Entity, Feature, FeatureView, Labels, Model, Source

                PROJECT_NAME = "chicks"
                weighings = Source("weighings", "schemas/weighing.avsc", "chick", "ts", partitions=4)
                weights = Source("weights", "schemas/weight.avsc", "chick", "ts", partitions=4)
                chick = Entity("chick", join_key="chick")
                # A chick's history: its weights known before each weighing.
                history = FeatureView(
                    "chick_history",
                    source=weights,
                    entity=chick,
                    kind="lifetime",
                    features=[Feature("weighings", "count"), Feature("last_weight", "last", "weight")],
                )
                weight = Labels("weight", weights, key="event_id", target="weight", task="regression")
                growth = Model(
                    "growth",
                    task="regression",
                    request=weighings,
                    request_fields=["time", "chick", "diet"],
                    features=["chick_history.weighings", "chick_history.last_weight"],
                    labels=weight,
                    learner="chick_model:new_model",
                    metric="MAE",
                    publish_every=100,
                    monitor=["time", "weighings"],
                )
                """,
        },
    )


def applied(settings: CommonSettings, project: Project, root: Path, **overrides: Any) -> TrainerSettings:
    s = TrainerSettings(
        **{
            **settings.model_dump(),
            "project": root,
            "trainer_group": f"{settings.topic_prefix}trainer",
            "trainer_prediction_grace_s": 0.3,
            "trainer_catchup_interval_s": 0.2,
            "trainer_publish_interval_s": 0.5,
            **overrides,
        }
    )
    apply(s, project)
    register_schemas(project)
    mark_live(s, project)  # as the feature processor does for a new project
    return s


class Running:
    """The trainer in a thread, stopped (and checked to have stopped) at the end of the block."""

    def __init__(self, settings: TrainerSettings, project: Project) -> None:
        self.stop = threading.Event()
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(settings, project), daemon=True)

    def _run(self, settings: TrainerSettings, project: Project) -> None:
        try:
            trainer.run(settings, project, self.stop)
        except BaseException as exc:
            self.error.append(exc)
            raise

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive() and not self.error, self.error


def learnt(s: TrainerSettings, model: str, n: int) -> bool:
    return len(trainer.learn_log(s, model)) >= n and (latest_record(s, model) or {}).get("trained_on") == n


def module(name: str, root: Path) -> Any:
    add_code_path(root)
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def progressive(learner: Any, metric: Any, stream: list[tuple[dict[str, Any], Any]]) -> Iterator[Any]:
    """Predict, feed the metric, learn: river's progressive validation, over ``stream`` in its order."""
    predict = (
        learner.predict_one
        if isinstance(metric, metrics.base.RegressionMetric)
        else learner.predict_proba_one
    )
    for x, y in stream:
        y_pred = predict(x)
        if y_pred is not None and y_pred != {}:
            metric.update(y, y_pred)
        learner.learn_one(x, y)
        yield y_pred


def as_logged(y_pred: Any) -> Any:
    """A prediction as the learn log's JSON carries it (``{"false": p, "true": q}``)."""
    return orjson.loads(orjson.dumps(y_pred, option=orjson.OPT_NON_STR_KEYS))


def duplicates(model: str) -> float:
    return REGISTRY.get_sample_value("tide_trainer_labels_duplicate_total", {"model": model}) or 0.0


def test_phishing_bootstrap_and_replays_predict_as_bare_river(
    settings: CommonSettings, tmp_path: Path
) -> None:
    root = tmp_path / "phishing"
    project = phishing_project(root, partitions=4)
    s = applied(settings, project, root)
    rows = list(datasets.Phishing())
    client = Client(s, project, 1)
    first, second = 1000, len(rows)

    def produce(start: int, stop: int, prefix: str = "p") -> None:
        client.produce(
            "pages",
            [{"event_id": f"{prefix}{i}", **rows[i][0], "ts": T0 + i * 1000} for i in range(start, stop)],
        )
        client.produce(
            "verdicts",
            [
                {"event_id": f"{prefix}{i}", "is_phishing": rows[i][1], "ts": T0 + i * 1000 + 500}
                for i in range(start, stop)
            ],
        )

    produce(0, first)  # history: the trainer starts from it
    before = duplicates("phishing")
    with Running(s, project):
        assert wait_until(lambda: learnt(s, "phishing", first), 60)
        # the consumer group then reads the same labels: every one is known learnt
        assert wait_until(lambda: duplicates("phishing") - before >= first, 60)
        produce(first, second)  # never scored: learnt from replayed features once their grace is over
        assert wait_until(lambda: learnt(s, "phishing", second), 60)
        produce(0, 100)  # the same labels again (a redelivery): nothing is learnt twice
        assert wait_until(lambda: duplicates("phishing") - before >= first + 100, 60)
    entries = trainer.learn_log(s, "phishing")
    keys = [e["key"] for e in entries]
    assert len(keys) == len(set(keys)) == len(rows)
    assert [e["path"] for e in entries] == ["replayed"] * len(rows)
    # the bootstrap learnt history in event-time order: river's progressive validation over the dataset
    bare = [
        step["Prediction"]
        for step in evaluate.iter_progressive_val_score(
            datasets.Phishing(),
            module("phishing_model", root).new_model(),
            metrics.ROCAUC(),
            yield_predictions=True,
        )
    ]
    assert keys[:first] == [f"p{i}" for i in range(first)]
    assert [e["y_pred"] for e in entries[:first]] == [as_logged(p) for p in bare[:first]]
    # and after it, bare river in the order the trainer recorded gives the same predictions, bit for bit
    factory = module("phishing_model", root).new_model
    metric = metrics.ROCAUC()
    by_key = {f"p{i}": row for i, row in enumerate(rows)}
    replayed = list(progressive(factory(), metric, [by_key[k] for k in keys]))
    assert [e["y_pred"] for e in entries] == [as_logged(p) for p in replayed]
    assert [e["y"] for e in entries] == [by_key[k][1] for k in keys]
    record = latest_record(s, "phishing")
    assert record is not None and record["trained_on"] == len(rows) and record["metric_name"] == "ROCAUC"
    assert record["metric_value"] == metric.get() and record["metric_value"] > 0.85
    assert (record["flavor"], record["task"]) == ("river", "binary")
    assert record["feature_names"] == PHISHING_FIELDS and record["definitions_digest"] == project.digest()
    assert [h["name"] for h in record["reference"]["features"]] == ["is_popular", "age_of_domain"]


def chick_inputs() -> dict[str, tuple[dict[str, Any], float, int]]:
    """Each weighing's key -> (inputs as of just before it, weight, event time): river's features plus the
    chick's history (how many weights, and the last one, known before the weighing)."""
    out, seen = {}, {}
    for i, (x, y) in enumerate(datasets.ChickWeights()):
        ts = T0 + x["time"] * DAY + x["chick"]
        prior = seen.setdefault(x["chick"], [])
        out[f"w{i}"] = (
            {**x, "weighings": len(prior), "last_weight": prior[-1] if prior else None},
            float(y),
            ts,
        )
        prior.append(float(y))
    return out


def test_chick_weights_with_a_view_and_partitions_interleaving_predict_as_bare_river(
    settings: CommonSettings, tmp_path: Path
) -> None:
    root = tmp_path / "chicks"
    project = chick_project(root)
    s = applied(settings, project, root)
    inputs = chick_inputs()
    client = Client(s, project, 1)
    with Running(s, project):
        assert wait_until(lambda: latest_record(s, "growth") is not None, 30)  # untrained version 1
        keys = list(inputs)
        for start in range(0, len(keys), 150):  # in chunks, while the trainer runs
            chunk = keys[start : start + 150]
            client.produce(
                "weighings",
                [
                    {
                        "event_id": k,
                        "chick": inputs[k][0]["chick"],
                        "diet": inputs[k][0]["diet"],
                        "time": inputs[k][0]["time"],
                        "ts": inputs[k][2],
                    }
                    for k in chunk
                ],
            )
            client.produce(
                "weights",
                [
                    {
                        "event_id": k,
                        "chick": inputs[k][0]["chick"],
                        "weight": inputs[k][1],
                        "ts": inputs[k][2],
                    }
                    for k in chunk
                ],
            )
        assert wait_until(lambda: learnt(s, "growth", len(inputs)), 90)
    entries = trainer.learn_log(s, "growth")
    keys = [e["key"] for e in entries]
    assert sorted(keys) == sorted(inputs) and len(keys) == len(set(keys))
    factory = module("chick_model", root).new_model
    metric = metrics.MAE()
    stream = [(inputs[k][0], inputs[k][1]) for k in keys]
    assert [e["y_pred"] for e in entries] == list(progressive(factory(), metric, stream))
    record = latest_record(s, "growth")
    assert record is not None and record["metric_value"] == metric.get() and record["task"] == "regression"
    assert record["feature_names"] == ["time", "chick", "diet", "weighings", "last_weight"]
    # the learn order differs from the dataset's here only where partitions interleaved: same multiset,
    # and a chick's history features never depended on it (point in time)
    assert any(e["y_pred"] not in (None, 0.0) for e in entries)
