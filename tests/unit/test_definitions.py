"""Project definitions: validation that names file, object and field; the registry's JSON form; loading."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from infra.errors import DefinitionError
from schemas.definitions import Entity, Feature, FeatureView, Labels, Model, Project, Source
from tide.project import load_project
from tide.scaffold import scaffold

EVENTS: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "test",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "site_id", "type": "string"},
        {"name": "kind", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "note", "type": {"type": "array", "items": "string"}},
        {"name": "ts", "type": "long"},
    ],
}
OUTCOMES: dict[str, Any] = {
    "type": "record",
    "name": "Outcome",
    "namespace": "test",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "site_id", "type": "string"},
        {"name": "faulty", "type": "boolean"},
        {"name": "minutes", "type": "double"},
        {"name": "ts", "type": "long"},
    ],
}


def parts() -> dict[str, Any]:
    readings = Source("readings", EVENTS, key="sensor_id", event_time="ts")
    outcomes = Source("outcomes", OUTCOMES, key="site_id", event_time="ts")
    sensor = Entity("sensor", "sensor_id")
    site = Entity("site", "site_id")
    recent = FeatureView(
        "sensor_recent",
        readings,
        sensor,
        [Feature("n_1h", "count"), Feature("value_mean_1h", "mean", "value")],
        window="1h",
    )
    faults = FeatureView(  # a view over the labels source
        "site_faults",
        outcomes,
        site,
        [Feature("fault_minutes_7d", "mean", "minutes")],
        window="7d",
        tile="1d",
    )
    faulty = Labels("faulty", outcomes, key="reading_id", target="faulty", task="binary")
    model = Model(
        "detector",
        "binary",
        readings,
        ["value", "kind"],
        ["sensor_recent.n_1h", "site_faults.fault_minutes_7d"],
        labels=faulty,
        learner="river.linear_model:LogisticRegression",
    )
    return {
        "readings": readings,
        "outcomes": outcomes,
        "sensor": sensor,
        "site": site,
        "recent": recent,
        "faults": faults,
        "faulty": faulty,
        "model": model,
    }


def test_a_project_gathers_what_its_definitions_refer_to() -> None:
    p = parts()
    project = Project.of("plant", [p["model"], p["recent"], p["faults"]])
    assert set(project.sources) == {"readings", "outcomes"}
    assert set(project.entities) == {"sensor", "site"}
    assert set(project.labels) == {"faulty"}
    assert [v.name for v in project.model_views(p["model"])] == ["sensor_recent", "site_faults"]
    assert p["model"].input_names == ("value", "kind", "n_1h", "fault_minutes_7d")
    assert p["recent"].entity_key == "sensor_id" and p["recent"].source_name == "readings"
    assert (p["recent"].window_ms, p["recent"].tile_ms, p["faults"].tile_ms) == (
        3_600_000,
        60_000,
        86_400_000,
    )


def test_json_form_round_trips_and_the_digest_is_stable() -> None:
    p = parts()
    project = Project.of("plant", [p["model"], p["recent"], p["faults"]])
    again = Project.from_dict(json.loads(project.canonical_json()))
    assert again.to_dict() == project.to_dict()
    assert again.digest() == project.digest()
    longer = FeatureView("sensor_recent", p["readings"], p["sensor"], p["recent"].features, window="2h")
    changed = Project.of("plant", [p["model"], longer, p["faults"]])
    assert changed.digest() != project.digest()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda p: Source("Readings", EVENTS, "sensor_id", "ts"),
            r"source 'Readings': name must be lower_snake",
        ),
        (
            lambda p: Source("r", EVENTS, "sensor_id", "value"),
            r"source 'r', field 'event_time': 'value' must be a long",
        ),
        (lambda p: Source("r", EVENTS, "nope", "ts"), r"source 'r', field 'key': 'nope' is not a field"),
        (lambda p: Source("predictions", EVENTS, "sensor_id", "ts"), r"reserved"),
        (
            lambda p: FeatureView(
                "v", p["readings"], p["sensor"], [Feature("m", "mean", "kind")], window="1h"
            ),
            r"feature view 'v', field 'features\[0\]' \(m\): mean needs a numeric field, 'kind' is string",
        ),
        (
            lambda p: FeatureView(
                "v", p["readings"], p["sensor"], [Feature("m", "last", "note")], window="1h"
            ),
            r"features\[0\]' \(m\): last needs a primitive field",
        ),
        (
            lambda p: FeatureView(
                "v", p["readings"], p["site"], [Feature("n", "count")], window="1h", tile="7m"
            ),
            r"feature view 'v', field 'window': must be a positive multiple of tile",
        ),
        (
            lambda p: FeatureView("v", p["outcomes"], p["sensor"], [Feature("n", "count")], window="1h"),
            r"feature view 'v', field 'entity': join key 'sensor_id' of entity 'sensor' is not a field",
        ),
        (
            lambda p: FeatureView("v", p["readings"], p["sensor"], [Feature("n", "count")], window="an hour"),
            r"feature view 'v', field 'window': 'an hour' is not a duration",
        ),
        (
            lambda p: Labels("l", p["outcomes"], "reading_id", "faulty", "regression"),
            r"labels 'l', field 'target': a regression target cannot be boolean",
        ),
        (
            lambda p: Labels("l", p["outcomes"], "reading_id", "faulty", "ranking"),
            r"labels 'l', field 'task': 'ranking' is not one of",
        ),
        (
            lambda p: Model("m", "binary", p["readings"], ["value"], ["sensor_recent"], p["faulty"], "a:b"),
            r"model 'm', field 'features\[0\]': 'sensor_recent' is not a 'view.feature' reference",
        ),
        (
            lambda p: Model("m", "binary", p["readings"], ["note"], [], p["faulty"], "a:b"),
            r"model 'm', field 'request_fields\[0\]': 'note' is array; request fields must be primitives",
        ),
        (
            lambda p: Model("m", "regression", p["readings"], ["value"], [], p["faulty"], "a:b"),
            r"model 'm', field 'labels': labels 'faulty' are for a binary task, the model is regression",
        ),
        (
            lambda p: Model("m", "binary", p["readings"], ["value"], [], p["faulty"], "not a path"),
            r"model 'm', field 'learner': 'not a path' is not an import path",
        ),
        (
            lambda p: Model("m", "binary", p["readings"], ["value"], [], p["faulty"], "a:b", monitor=["x"]),
            r"model 'm', field 'monitor\[0\]': 'x' is not an input of the model",
        ),
    ],
)
def test_bad_definitions_name_object_and_field(build: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        build(parts())


def test_cross_references_are_checked_by_the_project() -> None:
    p = parts()
    unknown_feature = Model(
        "m", "binary", p["readings"], ["value"], ["sensor_recent.nope"], p["faulty"], "a:b"
    )
    with pytest.raises(
        DefinitionError, match=r"model 'm', field 'features\[0\]': view 'sensor_recent' has no feature 'nope'"
    ):
        Project.of("plant", [unknown_feature, p["recent"]])
    unknown_view = Model("m", "binary", p["readings"], ["value"], ["gone.n"], p["faulty"], "a:b")
    with pytest.raises(DefinitionError, match=r"field 'features\[0\]': no feature view 'gone'"):
        Project.of("plant", [unknown_view, p["recent"]])
    # The request carries no site_id, so a site view cannot be joined at scoring time.
    readings_no_site = Source(
        "readings",
        {**EVENTS, "fields": [f for f in EVENTS["fields"] if f["name"] != "site_id"]},
        "sensor_id",
        "ts",
    )
    model = Model(
        "m", "binary", readings_no_site, ["value"], ["site_faults.fault_minutes_7d"], p["faulty"], "a:b"
    )
    with pytest.raises(DefinitionError, match=r"has no field 'site_id', the join key of entity 'site'"):
        Project.of("plant", [model, p["faults"]])
    twin = Source("readings", OUTCOMES, key="site_id", event_time="ts")
    with pytest.raises(DefinitionError, match=r"source 'readings' is declared twice, differently"):
        Project.of("plant", [p["readings"], twin])


def write_project(root: Path, definitions: str, learner: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "readings.avsc").write_text(json.dumps(EVENTS))
    (root / "outcomes.avsc").write_text(json.dumps(OUTCOMES))
    (root / "definitions.py").write_text(textwrap.dedent(definitions))
    if learner:
        (root / "learner_code.py").write_text(textwrap.dedent(learner))
    return root


DEFINITIONS = """
    from tide import Entity, Feature, FeatureView, Labels, Model, Source

    readings = Source("readings", "readings.avsc", key="sensor_id", event_time="ts")
    outcomes = Source("outcomes", "outcomes.avsc", key="site_id", event_time="ts")
    sensor = Entity("sensor", "sensor_id")
    recent = FeatureView("sensor_recent", readings, sensor, [Feature("n_1h", "count")], window="1h")
    faulty = Labels("faulty", outcomes, key="reading_id", target="faulty", task="binary")
    detector = Model("detector", "binary", readings, ["value"], ["sensor_recent.n_1h"], faulty,
                     learner="learner_code:new")
"""


def test_a_folder_loads_with_schema_files_relative_to_the_declaring_file(tmp_path: Path) -> None:
    root = write_project(tmp_path / "plant_ops", DEFINITIONS)
    project = load_project(root)
    assert project.name == "plant_ops"
    assert project.sources["readings"].parsed == EVENTS
    assert project.origins["model:detector"] == "plant_ops/definitions.py"


def test_loading_errors_name_the_file(tmp_path: Path) -> None:
    root = write_project(
        tmp_path / "p1", DEFINITIONS.replace('["sensor_recent.n_1h"]', '["sensor_recent.n_2h"]')
    )
    with pytest.raises(DefinitionError, match=r"p1/definitions.py: model 'detector', field 'features\[0\]'"):
        load_project(root)
    root = write_project(tmp_path / "p2", DEFINITIONS.replace('"readings.avsc"', '"missing.avsc"'))
    with pytest.raises(
        DefinitionError, match=r"definitions.py: source 'readings', field 'schema': cannot read"
    ):
        load_project(root)
    root = write_project(tmp_path / "p3", DEFINITIONS.replace('window="1h"', 'window="1 hour"'))
    with pytest.raises(
        DefinitionError, match=r"p3/definitions.py: feature view 'sensor_recent', field 'window'"
    ):
        load_project(root)


def test_the_scaffold_is_a_valid_project(tmp_path: Path) -> None:
    written = scaffold(tmp_path / "starter")
    assert {p.name for p in written} >= {"definitions.py", "learner.py", "events.avsc", "outcomes.avsc"}
    project = load_project(tmp_path / "starter")
    assert set(project.models) == {"scorer"}
    from tide.plan import try_learner

    try_learner(project.models["scorer"], project)  # the factory imports and learns a sample


def test_plan_names_a_learner_that_is_not_a_river_estimator(tmp_path: Path) -> None:
    from tide.plan import try_learner

    root = write_project(tmp_path / "p4", DEFINITIONS, "def new():\n    return object()\n")
    project = load_project(root)
    with pytest.raises(
        DefinitionError, match=r"model 'detector', field 'learner': learner_code:new\(\) returned object"
    ):
        try_learner(project.models["detector"], project)
    root = write_project(tmp_path / "p5", DEFINITIONS.replace("learner_code:new", "learner_code5:new"), "")
    (root / "learner_code5.py").write_text("def new():\n    raise RuntimeError('no weights')\n")
    project = load_project(root)
    with pytest.raises(DefinitionError, match=r"learner_code5:new\(\) raised RuntimeError: no weights"):
        try_learner(project.models["detector"], project)
