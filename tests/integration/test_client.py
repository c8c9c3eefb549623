"""The Python client a notebook uses: produce, online features, training sets, progressive evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
from river import compose, linear_model, metrics, preprocessing

from infra.errors import SchemaError
from infra.settings import CommonSettings
from tests.unit.test_definitions import DEFINITIONS, write_project
from tide import Client
from tide.plan import apply
from tide.project import load_project

pytestmark = pytest.mark.integration

LEARNER = """
from river import compose, linear_model, preprocessing

def new():
    scaled = compose.Select("value", "n_1h") | preprocessing.StandardScaler()
    return scaled | linear_model.LogisticRegression()
"""


def bare() -> compose.Pipeline:
    scaled = compose.Select("value", "n_1h") | preprocessing.StandardScaler()
    return scaled | linear_model.LogisticRegression()


def test_client_produces_reads_and_evaluates(settings: CommonSettings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "plant", DEFINITIONS, LEARNER)
    s = settings.model_copy(update={"project": root})
    apply(s, load_project(root))
    client = Client.connect(s)
    t0 = 1_700_000_000_000
    readings = [
        {
            "reading_id": f"r{i}",
            "sensor_id": f"s{i % 3}",
            "site_id": "x",
            "kind": "a",
            "value": float(i % 7),
            "note": [],
            "ts": t0 + i * 1000,
        }
        for i in range(60)
    ]
    outcomes = [
        {
            "reading_id": r["reading_id"],
            "site_id": "x",
            "faulty": r["value"] > 3,
            "minutes": 1.0,
            "ts": r["ts"],
        }
        for r in readings
    ]
    assert client.produce("readings", readings) == 60
    assert client.produce("outcomes", outcomes) == 60
    with pytest.raises(SchemaError, match="value"):
        client.produce("readings", [{**readings[0], "value": "warm"}])

    frame = client.training_set("detector")
    assert list(frame.columns) == ["key", "ts", "value", "n_1h", "target"]
    assert len(frame) == 60
    first = frame.sort_values("ts").iloc[3]  # sensor s0's second reading: one earlier reading of s0 in 1h
    assert (first["key"], first["n_1h"], bool(first["target"])) == ("r3", 1, False)

    result = client.evaluate("detector")
    model, metric, expected = bare(), metrics.ROCAUC(), []
    for row in frame.sort_values(["ts", "key"]).itertuples():
        x = {"value": row.value, "n_1h": row.n_1h}
        y_pred = model.predict_proba_one(x)
        expected.append(y_pred)
        metric.update(bool(row.target), y_pred)
        model.learn_one(x, bool(row.target))
    assert result["examples"] == 60 and result["metric"] == "ROCAUC"
    assert result["predictions"] == expected
    assert result["value"] == pytest.approx(metric.get())
    later = client.evaluate("detector", bare, start_ms=t0 + 30_000)
    assert later["examples"] == 30

    online = client.online_features("sensor_recent", ["never-seen"])
    assert online.to_dict("records") == [
        {"entity": "never-seen", "n_1h": 0, "status": "missing", "age_ms": None}
    ]
