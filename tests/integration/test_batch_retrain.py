"""``tide retrain`` against the real broker: generated events and labels in, a signed ONNX version out,
loaded by serving's loader and scoring as torch does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tide import cli
from infra.errors import ModelLoadError
from models.signing import Verifier, generate_key_pair
from online_training import batch
from online_training.batch import NUMERIC_FEATURES, fit, split_by_time, torch_scores, training_rows
from online_training.publish import latest_record
from online_training.settings import RetrainSettings
from models.runtime import LoadPolicy, feature_matrix, load_model
from streams.produce import produce_generated
from streams.tail import tail

pytestmark = pytest.mark.integration


def test_retrain_publishes_onnx_versions_that_serving_loads(
    settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = generate_key_pair(tmp_path / "keys")
    rs = RetrainSettings(
        **settings.model_dump(),
        retrain_epochs=10,
        retrain_min_labels=500,
        signing_key_file=keys["private_key"],
        artifact_inline_max_bytes=0,  # the first version travels by URI
    )
    assert batch.retrain(rs)["published"] is False  # no labels yet
    produce_generated(rs, count=3000, label_delay=100, seed=11)

    result = batch.retrain(rs)
    assert result["published"] is True, result
    assert (result["model"], result["version"], result["device"]) == ("fraud-nn", 1, "cpu")
    assert result["max_abs_diff"] <= 1e-5 and result["roc_auc"] > 0.8
    assert result["labels"] == 3000 and result["train"] + result["held_out"] == 3000

    record = latest_record(rs, "fraud-nn")
    assert record is not None
    assert (record["flavor"], record["version"], record["trained_on"]) == ("onnx", 1, result["train"])
    assert record["artifact"] == b"" and record["artifact_uri"].startswith(tmp_path.as_uri())
    assert record["feature_names"] == list(NUMERIC_FEATURES)
    assert record["key_id"] == keys["key_id"] and record["reference"]["size"] == result["held_out"]
    assert record["metric_name"] == "roc_auc_held_out" and record["metric_value"] == result["roc_auc"]

    # serving loads it (URI fetched, digest and signature checked) and scores as torch does
    policy = LoadPolicy(verifier=Verifier.from_pem_file(Path(keys["public_key"])))
    loaded = load_model(record, policy)
    assert loaded.signed_by == keys["key_id"] and loaded.runtime.provider == "CPUExecutionProvider"
    train, held_out = split_by_time(training_rows(rs), rs.retrain_holdout)
    again = fit(rs, train, held_out)  # same data, same seed: the same model
    expected = torch_scores(again.module, feature_matrix(held_out, NUMERIC_FEATURES))
    served = np.asarray(loaded.runtime.predict_many(held_out))
    assert np.abs(served - expected).max() <= 1e-5
    one_by_one = np.asarray([loaded.runtime.predict_one(x) for x in held_out[:200]])
    assert np.abs(one_by_one - expected[:200]).max() <= 1e-5

    # the CLI, with the same settings from the environment: nothing new, nothing published
    for key, value in {
        "TIDE_KAFKA_BOOTSTRAP": rs.kafka_bootstrap,
        "TIDE_REDIS_URL": rs.redis_url,
        "TIDE_TOPIC_PREFIX": rs.topic_prefix,
        "TIDE_STATE_DIR": str(rs.state_dir),
        "TIDE_RETRAIN_MIN_LABELS": "500",
    }.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["retrain"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["published"] is False and "no new labels" in summary["reason"]

    # more labels: version 2, inline this time (default threshold), versions of `fraud` untouched
    produce_generated(rs, count=1000, label_delay=100, seed=12)
    inline = RetrainSettings(**{**rs.model_dump(), "artifact_inline_max_bytes": 256 * 1024})
    second = batch.retrain(inline)
    assert (second["published"], second["version"], second["labels"]) == (True, 2, 4000)
    versions = [r["value"] for r in tail(rs, "models")]
    assert [(v["model"], v["version"]) for v in versions] == [("fraud-nn", 1), ("fraud-nn", 2)]
    newest = latest_record(rs, "fraud-nn")
    assert newest is not None and newest["artifact_uri"] is None and newest["artifact"]
    assert load_model(newest, policy).version == 2
    with pytest.raises(ModelLoadError, match="bad signature"):  # a replay as version 3 is refused
        load_model({**newest, "version": 3}, policy)
