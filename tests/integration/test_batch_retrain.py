"""``tide retrain`` against the real broker: events and labels in, signed ONNX versions of every model with
a batch trainer out, loaded by serving's loader and scoring as torch does (binary and regression)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from river import datasets

from examples.fraud.driver.generator import GeneratorConfig, TransactionGenerator
from infra.errors import ModelLoadError
from infra.settings import CommonSettings
from models.inputs import ModelInputs
from models.runtime import LoadPolicy, feature_matrix, load_model
from models.signing import Verifier, generate_key_pair
from online_training import batch
from online_training.history import all_examples
from online_training.network import torch_scores
from online_training.publish import latest_record
from online_training.settings import RetrainSettings
from schemas import registry
from schemas.definitions import Project
from schemas.registry import register_schemas
from streams.tail import tail
from tests.integration.test_trainer import mark_live
from tide import Client, cli
from tide.plan import apply
from tide.processes import wait_until
from tide.project import load_project

pytestmark = pytest.mark.integration


def produce_history(
    settings: CommonSettings, project: Project, count: int, config: GeneratorConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``count`` generated transactions and every one's label, produced; returns both."""
    gen = TransactionGenerator(config)
    events, labels = [], []
    for _ in range(count):
        event, due = gen.next()
        events.append(event)
        labels += due
    labels += gen.drain()
    client = Client(settings, project, 1)
    client.produce("transactions", events)
    client.produce("chargebacks", labels)
    return events, labels


def produce_generated(settings: CommonSettings, project: Project, count: int, seed: int) -> int:
    """``count`` transactions and every one's label; returns how many labels."""
    config = GeneratorConfig(cards=300, seed=seed, fraud_rate=0.1, label_delay=100)
    return len(produce_history(settings, project, count, config)[1])


def test_retrain_publishes_onnx_versions_that_serving_loads(
    fraud: CommonSettings,
    fraud_project: Project,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = generate_key_pair(tmp_path / "keys")
    rs = RetrainSettings(
        **fraud.model_dump(),
        retrain_epochs=10,
        retrain_min_labels=500,
        signing_key_file=keys["private_key"],
        artifact_inline_max_bytes=0,  # the first version travels by URI
    )
    [waiting] = batch.retrain(rs, fraud_project)  # its view has no live version yet
    assert (waiting["published"], waiting["reason"]) == (
        False,
        "waiting for a live version of view(s) card_activity",
    )
    mark_live(rs, fraud_project)
    [empty] = batch.retrain(rs, fraud_project)  # fraud_nn only: fraud has a river learner
    assert (empty["model"], empty["published"], empty["labels"]) == ("fraud_nn", False, 0)
    n = produce_generated(rs, fraud_project, 3000, seed=11)
    assert n == 3000

    [result] = batch.retrain(rs, fraud_project)
    assert result["published"] is True, result
    assert (result["model"], result["version"], result["device"]) == ("fraud_nn", 1, "cpu")
    assert result["max_abs_diff"] <= 1e-5 and result["roc_auc"] > 0.8
    assert result["metric_name"] == "ROCAUC" and result["metric_value"] > 0.8
    assert result["labels"] == 3000 and result["train"] + result["held_out"] == 3000

    model = fraud_project.models["fraud_nn"]
    record = latest_record(rs, "fraud_nn")
    assert record is not None
    assert (record["flavor"], record["version"], record["trained_on"]) == ("onnx", 1, result["train"])
    assert (record["task"], record["definitions_digest"]) == ("binary", fraud_project.digest())
    assert record["view_versions"] == {"card_activity": 1} == result["view_versions"]
    assert record["artifact"] == b"" and record["artifact_uri"].startswith(tmp_path.as_uri())
    assert record["feature_names"] == list(model.input_names)
    assert record["key_id"] == keys["key_id"] and record["reference"]["size"] == result["held_out"]
    profiled = [h["name"] for h in record["reference"]["features"]]
    profiled += [c["name"] for c in record["reference"].get("categories") or ()]  # binary inputs: counts
    assert sorted(profiled) == ["amount", "card_present"]
    assert record["metric_name"] == "ROCAUC" and record["metric_value"] == result["metric_value"]

    # serving loads it (URI fetched, digest and signature checked) and scores as torch does
    policy = LoadPolicy(verifier=Verifier.from_pem_file(Path(keys["public_key"])))
    inputs = ModelInputs.of(fraud_project, model)
    loaded = load_model(record, inputs, policy)
    assert loaded.signed_by == keys["key_id"] and loaded.runtime.provider == "CPUExecutionProvider"
    train, held_out = batch.split_by_time(all_examples(rs, fraud_project, model), rs.retrain_holdout)
    again = batch.fit(rs, model, train, held_out)  # same data, same seed: the same model
    rows = [e.x for e in held_out]
    expected = torch_scores(again.module, feature_matrix(rows, model.input_names))
    served = np.asarray([o.score for o in loaded.runtime.predict_many(rows)])
    assert np.abs(served - expected).max() <= 1e-5
    one_by_one = np.asarray([loaded.runtime.predict_one(x).score for x in rows[:200]])
    assert np.abs(one_by_one - expected[:200]).max() <= 1e-5

    # the CLI, with the same settings from the environment: nothing new, nothing published
    for key, value in {
        "TIDE_KAFKA_BOOTSTRAP": rs.kafka_bootstrap,
        "TIDE_REDIS_URL": rs.redis_url,
        "TIDE_TOPIC_PREFIX": rs.topic_prefix,
        "TIDE_STATE_DIR": str(rs.state_dir),
        "TIDE_PROJECT": str(rs.project),
        "TIDE_RETRAIN_MIN_LABELS": "500",
    }.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["retrain"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["model"] == "fraud_nn" and summary["published"] is False
    assert "no new labels" in summary["reason"]

    # more labels: version 2, inline this time (default threshold), and nothing of the river model `fraud`
    produce_generated(rs, fraud_project, 1000, seed=12)
    inline = RetrainSettings(**{**rs.model_dump(), "artifact_inline_max_bytes": 256 * 1024})
    [second] = batch.retrain(inline, fraud_project)
    assert (second["published"], second["version"], second["labels"]) == (True, 2, 4000)
    versions = [r["value"] for r in tail(rs, "models")]
    assert [(v["model"], v["version"]) for v in versions] == [("fraud_nn", 1), ("fraud_nn", 2)]
    newest = latest_record(rs, "fraud_nn")
    assert newest is not None and newest["artifact_uri"] is None and newest["artifact"]
    assert load_model(newest, inputs, policy).version == 2
    with pytest.raises(ModelLoadError, match="bad signature"):  # a replay as version 3 is refused
        load_model({**newest, "version": 3}, inputs, policy)


CHICK_FILES = {
    "schemas/weighing.avsc": {
        "type": "record",
        "name": "Weighing",
        "fields": [
            {"name": n, "type": t}
            for n, t in (
                ("event_id", "string"),
                ("chick", "long"),
                ("diet", "long"),
                ("time", "long"),
                ("ts", "long"),
            )
        ],
    },
    "schemas/weight.avsc": {
        "type": "record",
        "name": "Weight",
        "fields": [
            {"name": n, "type": t}
            for n, t in (("event_id", "string"), ("chick", "long"), ("weight", "double"), ("ts", "long"))
        ],
    },
}
CHICK_CODE = {
    "chick_network.py": """
        from online_training.network import MLP


        def new_network(n_inputs):
            return MLP(n_inputs, hidden=16)
        """,
    "definitions.py": """
        from tide import Labels, Model, Source

        PROJECT_NAME = "chick_batch"
        weighings = Source("weighings", "schemas/weighing.avsc", "chick", "ts", partitions=2)
        weights = Source("weights", "schemas/weight.avsc", "chick", "ts", partitions=2)
        weight = Labels("weight", weights, key="event_id", target="weight", task="regression")
        growth_nn = Model(
            "growth_nn",
            task="regression",
            request=weighings,
            request_fields=["time", "diet"],
            labels=weight,
            batch_trainer="chick_network:new_network",
            metric="MAE",
            monitor=["time"],
        )
        """,
}


def write_chick_project(root: Path) -> Path:
    """The regression project over the ChickWeights records: its schemas and code written to ``root``."""
    for name, schema in CHICK_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(schema))
    for name, code in CHICK_CODE.items():
        (root / name).write_text(textwrap.dedent(code))
    return root


def test_a_regression_model_is_retrained_and_served_as_values(
    settings: CommonSettings, tmp_path: Path
) -> None:
    root = write_chick_project(tmp_path / "chick_batch")
    project = load_project(root)
    rs = RetrainSettings(
        **{**settings.model_dump(), "project": root},
        retrain_min_labels=100,
        retrain_epochs=200,
        retrain_batch_size=32,
        retrain_lr=1e-2,
    )
    apply(rs, project)
    register_schemas(project)
    rows: list[tuple[dict[str, Any], Any]] = list(datasets.ChickWeights())
    ts = [1_700_000_000_000 + x["time"] * 86_400_000 + x["chick"] for x, _ in rows]
    client = Client(rs, project, 1)
    client.produce("weighings", [{"event_id": f"w{i}", **x, "ts": ts[i]} for i, (x, _) in enumerate(rows)])
    client.produce(
        "weights",
        [
            {"event_id": f"w{i}", "chick": x["chick"], "weight": float(y), "ts": ts[i]}
            for i, (x, y) in enumerate(rows)
        ],
    )
    [result] = batch.retrain(rs, project)
    assert result["published"] is True, result
    assert result["labels"] == len(rows) and result["metric_value"] == pytest.approx(result["mae"])
    assert result["mae"] < 0.6 * result["baseline_mae"], result  # far better than the training mean
    record = latest_record(rs, "growth_nn")
    assert record is not None and (record["task"], record["feature_names"]) == (
        "regression",
        ["time", "diet"],
    )
    model = project.models["growth_nn"]
    loaded = load_model(record, ModelInputs.of(project, model))
    late = loaded.runtime.predict_one({"time": 21, "diet": 3}).score
    early = loaded.runtime.predict_one({"time": 0, "diet": 3}).score
    assert 150 < late < 400 and 20 < early < 90  # values on the target's scale, not standardised ones


def test_a_periodic_retrain_follows_the_registry(settings: CommonSettings, tmp_path: Path) -> None:
    root = write_chick_project(tmp_path / "chick_batch")
    project = load_project(root)
    rs = RetrainSettings(
        **{**settings.model_dump(), "project": root}, retrain_min_labels=100, retrain_epochs=5
    )
    apply(rs, project)
    register_schemas(project)
    rows: list[tuple[dict[str, Any], Any]] = list(datasets.ChickWeights())
    client = Client(rs, project, 1)
    client.produce(
        "weighings",
        [{"event_id": f"w{i}", **x, "ts": 1_700_000_000_000 + i} for i, (x, _) in enumerate(rows)],
    )
    client.produce(
        "weights",
        [
            {"event_id": f"w{i}", "chick": x["chick"], "weight": float(y), "ts": 0}
            for i, (x, y) in enumerate(rows)
        ],
    )
    results: list[dict[str, Any]] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=batch.run,
        args=(rs, project),
        kwargs={"every_s": 3600, "stop": stop, "on_result": results.append},
    )
    thread.start()
    try:
        assert wait_until(lambda: [r["model"] for r in results] == ["growth_nn"], 60)
        # a model applied while it runs is retrained at once, not at the next cycle (an hour away)
        second = dataclasses.replace(project.models["growth_nn"], name="growth_nn2")
        apply(rs, dataclasses.replace(project, models={**project.models, "growth_nn2": second}))
        assert wait_until(lambda: len(results) == 2, 60)
        assert results[1]["model"] == "growth_nn2" and results[1]["published"], results[1]
        newest = registry.latest(rs)
        assert newest is not None and latest_record(rs, "growth_nn2")["definitions_digest"] == newest.digest  # type: ignore[index]
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and len(results) == 2
