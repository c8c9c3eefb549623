"""Plan diffs: every change classed metadata / additive / breaking; view versions assigned and kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.errors import DefinitionError
from schemas.definitions import Project
from tests.unit.test_definitions import DEFINITIONS, write_project
from tide.diff import diff, versioned
from tide.project import load_project


def project_of(tmp_path: Path, name: str, definitions: str = DEFINITIONS) -> Project:
    return load_project(write_project(tmp_path / name, definitions + '\n    PROJECT_NAME = "plant"\n'))


def changes(tmp_path: Path, before: str, after: str) -> list[dict[str, str]]:
    old = project_of(tmp_path, "before", before)
    return diff(old, versioned(old, project_of(tmp_path, "after", after), 2))


def test_a_first_apply_adds_everything(tmp_path: Path) -> None:
    project = project_of(tmp_path, "p")
    got = diff(None, project)
    assert {(c["kind"], c["name"], c["change"], c["class"]) for c in got} == {
        ("sources", "readings", "added", "additive"),
        ("sources", "outcomes", "added", "additive"),
        ("entities", "sensor", "added", "additive"),
        ("views", "sensor_recent", "added", "additive"),
        ("labels", "faulty", "added", "additive"),
        ("models", "detector", "added", "additive"),
    }


@pytest.mark.parametrize(
    ("old", "new", "kind", "name", "klass", "detail"),
    [
        # metadata: touches nothing
        (
            '[Feature("n_1h", "count")], window="1h"',
            '[Feature("n_1h", "count")], window="1h", '
            'description="per sensor", owner="plant-team", tags={"tier": "gold"}',
            "views",
            "sensor_recent",
            "metadata",
            "description changed; owner changed; tags changed",
        ),
        (
            'learner="learner_code:new")',
            'learner="learner_code:new", owner="ml")',
            "models",
            "detector",
            "metadata",
            "owner changed",
        ),
        # additive: new features in a view, a model's cadence
        (
            '[Feature("n_1h", "count")]',
            '[Feature("n_1h", "count"), Feature("v_sum", "sum", "value")]',
            "views",
            "sensor_recent",
            "additive",
            "features added: v_sum (new version, backfilled)",
        ),
        (
            'learner="learner_code:new")',
            'learner="learner_code:new", publish_every=50)',
            "models",
            "detector",
            "additive",
            "publish_every 500 -> 50",
        ),
        # breaking: a view's window, a model's inputs or task
        (
            'window="1h"',
            'window="2h"',
            "views",
            "sensor_recent",
            "breaking",
            "window_ms 3600000 -> 7200000 (new version, backfilled)",
        ),
        (
            '["value"], ["sensor_recent.n_1h"]',
            '["value", "kind"], ["sensor_recent.n_1h"]',
            "models",
            "detector",
            "breaking",
            "request_fields ['value'] -> ['value', 'kind']",
        ),
        (
            'key="sensor_id", event_time="ts")\n    outcomes',
            'key="site_id", event_time="ts")\n    outcomes',
            "sources",
            "readings",
            "breaking",
            "key 'sensor_id' -> 'site_id'",
        ),
    ],
)
def test_each_change_is_classed(
    tmp_path: Path, old: str, new: str, kind: str, name: str, klass: str, detail: str
) -> None:
    assert old in DEFINITIONS
    got = changes(tmp_path, DEFINITIONS, DEFINITIONS.replace(old, new, 1))
    assert got == [{"kind": kind, "name": name, "change": "changed", "class": klass, "detail": detail}]


def test_a_removed_model_is_breaking(tmp_path: Path) -> None:
    without = DEFINITIONS.split("    detector = ")[0]
    got = changes(tmp_path, DEFINITIONS, without)
    assert got == [
        {
            "kind": "models",
            "name": "detector",
            "change": "removed",
            "class": "breaking",
            "detail": "model removed",
        }
    ]


def test_a_changed_view_gets_the_new_registry_version_and_keeps_the_old_one(tmp_path: Path) -> None:
    v1 = project_of(tmp_path, "v1")
    assert v1.views["sensor_recent"].version == 1
    v2 = versioned(v1, project_of(tmp_path, "v2", DEFINITIONS.replace('window="1h"', 'window="2h"')), 2)
    assert v2.views["sensor_recent"].version == 2
    assert set(v2.previous_views) == {"sensor_recent@1"}
    assert v2.previous_views["sensor_recent@1"].window_ms == 3_600_000
    assert v2.view_version("sensor_recent", 1).window_ms == 3_600_000
    assert set(v2.view_versions) == {"sensor_recent@1", "sensor_recent@2"}
    assert Project.from_dict(v2.to_dict()).to_dict() == v2.to_dict()  # the registry keeps both

    # Metadata only: the version stays, nothing more is kept.
    v3 = versioned(
        v2, project_of(tmp_path, "v3", DEFINITIONS.replace('window="1h"', 'window="2h", owner="x"')), 3
    )
    assert (v3.views["sensor_recent"].version, set(v3.previous_views)) == (2, {"sensor_recent@1"})
    # Once retired, a version is dropped; a version number is never reused.
    v4 = versioned(v3, project_of(tmp_path, "v4"), 4, retired={"sensor_recent@1"})
    assert v4.views["sensor_recent"].version == 4
    assert set(v4.previous_views) == {"sensor_recent@2"}


def test_a_model_reads_the_view_versions_its_lineage_names(tmp_path: Path) -> None:
    v1 = project_of(tmp_path, "v1")
    v2 = versioned(v1, project_of(tmp_path, "v2", DEFINITIONS.replace('window="1h"', 'window="2h"')), 2)
    model = v2.models["detector"]
    assert [v.ref for v in v2.model_views(model)] == ["sensor_recent@2"]
    assert [v.ref for v in v2.model_views(model, {"sensor_recent": 1})] == ["sensor_recent@1"]
    from infra.errors import UnknownViewVersion

    with pytest.raises(UnknownViewVersion, match="keeps no version 7 of view 'sensor_recent'"):
        v2.model_views(model, {"sensor_recent": 7})


def test_a_declared_backfill_start_is_part_of_what_a_view_computes(tmp_path: Path) -> None:
    v1 = project_of(tmp_path, "v1")
    text = DEFINITIONS.replace('window="1h"', 'window="1h", backfill_start="2026-11-01"')
    v2 = versioned(v1, project_of(tmp_path, "v2", text), 2)
    view = v2.views["sensor_recent"]
    assert view.backfill_start_ms == 1_793_491_200_000  # 2026-11-01T00:00:00Z
    assert (view.version, Project.from_dict(v2.to_dict()).views["sensor_recent"].backfill_start_ms) == (
        2,
        view.backfill_start_ms,
    )
    with pytest.raises(DefinitionError, match=r"feature view 'sensor_recent', field 'backfill_start'"):
        project_of(tmp_path, "v3", DEFINITIONS.replace('window="1h"', 'window="1h", backfill_start="soon"'))
