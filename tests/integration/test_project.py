"""Projects against the real broker: plan and apply, the registry's versions, schema evolution, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.errors import DefinitionError
from infra.kafka import read_to_end
from infra.settings import CommonSettings
from schemas import codec, registry
from tests.unit.test_definitions import DEFINITIONS, EVENTS, write_project
from tide.plan import apply, plan
from tide.project import load_project

pytestmark = pytest.mark.integration

LEARNER = """
from river import compose, linear_model, preprocessing

def new():
    scaled = compose.Select("value", "n_1h") | preprocessing.StandardScaler()
    return scaled | linear_model.LogisticRegression()
"""


def test_apply_creates_topics_and_registers_versions(settings: CommonSettings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "plant", DEFINITIONS, LEARNER)
    project = load_project(root)
    first = plan(settings, project)
    assert (first.version, first.current) == (1, None)
    assert {c["name"] for c in first.changes} == {
        "readings",
        "outcomes",
        "sensor",
        "sensor_recent",
        "faulty",
        "detector",
    }
    assert first.topics == {settings.topic_prefix + "readings": 4, settings.topic_prefix + "outcomes": 4}
    assert registry.latest(settings) is None  # plan changes nothing

    done = apply(settings, project)
    assert done["applied"] and done["version"] == 1
    loaded = registry.load(settings)
    assert (loaded.version, loaded.digest) == (1, project.digest())
    assert loaded.project.to_dict() == project.to_dict()
    # Its topics exist: a record produced to the source topic reads back (registered schema decodes it).
    from infra.kafka import make_producer

    record = {
        "reading_id": "r1",
        "sensor_id": "s1",
        "site_id": "x",
        "kind": "a",
        "value": 1.5,
        "note": [],
        "ts": 5,
    }
    producer = make_producer(settings)
    producer.produce(settings.topic_prefix + "readings", value=codec.encode("readings", record))
    assert producer.flush(10) == 0
    got = [
        codec.decode(m.value(), "readings")
        for m in read_to_end(settings, settings.topic_prefix + "readings", 4)
    ]
    assert got == [record]

    again = apply(settings, project)  # unchanged: nothing written
    assert (again["applied"], again["version"], again["changes"]) == (False, 1, [])

    renamed = DEFINITIONS.replace('window="1h"', 'window="2h"') + '\n    PROJECT_NAME = "plant"\n'
    p2 = plan(settings, load_project(write_project(tmp_path / "plant_v2", renamed, LEARNER)))
    assert [(c["name"], c["change"], c["class"]) for c in p2.changes] == [
        ("sensor_recent", "changed", "breaking")
    ]
    assert p2.version == 2


def test_source_schemas_evolve_backward_compatibly(settings: CommonSettings, tmp_path: Path) -> None:
    root = write_project(tmp_path / "plant", DEFINITIONS, LEARNER)
    apply(settings, load_project(root))
    old = {
        "reading_id": "r1",
        "sensor_id": "s1",
        "site_id": "x",
        "kind": "a",
        "value": 1.5,
        "note": [],
        "ts": 5,
    }
    old_payload = codec.encode("readings", old)

    added = {**EVENTS, "fields": [*EVENTS["fields"], {"name": "unit", "type": "string", "default": "C"}]}
    (root / "readings.avsc").write_text(json.dumps(added))
    done = apply(settings, load_project(root))
    assert done["version"] == 2
    current = registry.load(settings).project.sources["readings"]
    assert [len(v["fields"]) for v in current.versions] == [7, 8]
    assert codec.decode(old_payload, "readings") == {**old, "unit": "C"}  # old records stay readable

    retyped = {
        **added,
        "fields": [
            f if f["name"] != "value" else {"name": "value", "type": "string"} for f in added["fields"]
        ],
    }
    (root / "readings.avsc").write_text(json.dumps(retyped))
    with pytest.raises(
        DefinitionError,
        match=r"source 'readings', field 'schema': the new schema cannot read records written with "
        r"registered version 1",
    ):
        plan(settings, load_project(root))
    assert registry.load(settings).version == 2  # nothing applied


def test_a_second_project_in_the_same_namespace_is_refused(settings: CommonSettings, tmp_path: Path) -> None:
    apply(settings, load_project(write_project(tmp_path / "plant", DEFINITIONS, LEARNER)))
    with pytest.raises(DefinitionError, match="runs project 'plant'"):
        plan(settings, load_project(write_project(tmp_path / "other", DEFINITIONS, LEARNER)))


def test_services_fail_clearly_before_anything_is_applied(settings: CommonSettings) -> None:
    with pytest.raises(DefinitionError, match=r"no definitions applied .* run 'tide apply"):
        registry.load(settings)


def tide(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tide.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_init_plan_apply_from_the_command_line(settings: CommonSettings, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TIDE_REDIS_URL": settings.redis_url,
        "TIDE_TOPIC_PREFIX": settings.topic_prefix,
        "TIDE_STATE_DIR": str(tmp_path / "state"),
    }
    folder = tmp_path / "starter"
    init = tide("init", str(folder), env=env)
    assert init.returncode == 0, init.stderr
    planned = tide("plan", "--project", str(folder), env=env)
    assert planned.returncode == 0, planned.stderr
    out = json.loads(planned.stdout)
    assert (out["project"], out["version"], out["up_to_date"]) == ("starter", 1, False)
    applied = tide("apply", "--project", str(folder), env={**env, "TIDE_PROJECT": str(folder)})
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout.splitlines()[-1])["applied"] is True
    assert registry.load(settings).project.name == "starter"

    # A bad definition is refused with file, object and field, and nothing is applied.
    text = (folder / "definitions.py").read_text().replace('window="1h"', 'window="1 hour"')
    (folder / "definitions.py").write_text(text)
    bad = tide("apply", "--project", str(folder), env=env)
    assert bad.returncode == 2
    assert "starter/definitions.py: feature view 'user_activity', field 'window'" in bad.stderr
    assert registry.load(settings).version == 1
