"""The registry while Tide runs: compare-and-set versions, breaking changes refused, services following."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from infra.errors import BreakingChange, DefinitionError, RegistryConflict
from infra.settings import CommonSettings
from schemas import registry
from schemas.definitions import Project
from tests.integration.test_project import LEARNER
from tests.unit.test_definitions import DEFINITIONS, write_project
from tide.plan import apply, plan
from tide.project import load_project

pytestmark = pytest.mark.integration

NAMED = DEFINITIONS + '\n    PROJECT_NAME = "plant"\n'
WIDER = NAMED.replace('window="1h"', 'window="2h"')
MORE = (
    NAMED
    + """
    by_site = Entity("site", "site_id")
    site_recent = FeatureView("site_recent", readings, by_site, [Feature("site_n", "count")], window="1h")
"""
)


def project(tmp_path: Path, name: str, text: str) -> Project:
    return load_project(write_project(tmp_path / name, text, LEARNER))


def test_two_concurrent_applies_cannot_both_win(settings: CommonSettings, tmp_path: Path) -> None:
    apply(settings, project(tmp_path, "v1", NAMED))
    a = plan(settings, project(tmp_path, "a", MORE))
    b = plan(
        settings, project(tmp_path, "b", NAMED.replace("learner_code:new", 'learner_code:new", owner="ml'))
    )
    assert a.version == b.version == 2  # both planned against version 1

    start = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def publish(name: str, p: Project) -> None:
        start.wait()
        try:
            outcome[name] = registry.publish(settings, p, 2).digest
        except RegistryConflict as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=publish, args=(n, p.project)) for n, p in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    won = [n for n, o in outcome.items() if isinstance(o, str)]
    lost = [o for o in outcome.values() if isinstance(o, RegistryConflict)]
    assert len(won) == 1 and len(lost) == 1, outcome
    assert "run 'tide plan' again" in str(lost[0])
    current = registry.load(settings)
    assert (current.version, current.digest) == (2, outcome[won[0]])

    # The loser plans again, against the winner: its change would now be version 3.
    loser = b if won == ["a"] else a
    replanned = plan(settings, loser.project)
    assert (replanned.current and replanned.current.version, replanned.version) == (2, 3)
    with pytest.raises(RegistryConflict):  # a stale plan never lands, even long after
        registry.publish(settings, a.project, 2)


def test_apply_refuses_breaking_changes_unless_allowed(settings: CommonSettings, tmp_path: Path) -> None:
    apply(settings, project(tmp_path, "v1", NAMED))
    with pytest.raises(
        BreakingChange, match=r"views 'sensor_recent': window_ms 3600000 -> 7200000"
    ) as refused:
        apply(settings, project(tmp_path, "v2", WIDER))
    assert [c["name"] for c in refused.value.changes] == ["sensor_recent"]
    assert registry.load(settings).version == 1  # nothing applied

    done = apply(settings, project(tmp_path, "v2b", WIDER), allow_breaking=True)
    assert (done["applied"], done["version"], done["views"]) == (True, 2, {"sensor_recent": 2})
    kept = registry.load(settings).project
    assert set(kept.view_versions) == {"sensor_recent@1", "sensor_recent@2"}
    assert kept.view_version("sensor_recent", 1).window_ms == 3_600_000  # the old one keeps serving

    # Removing a view a model still reads is refused, naming the model.
    gone = NAMED.replace(
        'recent = FeatureView("sensor_recent", readings, sensor, [Feature("n_1h", "count")], window="1h")', ""
    )
    with pytest.raises(DefinitionError, match=r"model 'detector', field 'features\[0\]': no feature view"):
        plan(settings, project(tmp_path, "v3", gone))


def test_running_services_see_a_new_version_within_seconds(settings: CommonSettings, tmp_path: Path) -> None:
    apply(settings, project(tmp_path, "v1", NAMED))
    follower = registry.Follower(settings)
    seen: list[registry.Registered] = []
    stop = threading.Event()
    thread = registry.follow(settings, seen.append, stop, interval_s=0.1, follower=follower)
    try:
        assert follower.current.version == 1
        apply(settings, project(tmp_path, "v2", MORE))
        applied_at = time.monotonic()  # the record is in the log once apply returns
        while not seen and time.monotonic() - applied_at < 10:
            time.sleep(0.02)
        assert seen, "the follower did not see version 2"
        assert time.monotonic() - applied_at < 3
        assert seen[0].version == 2 and "site_recent" in seen[0].project.views
    finally:
        stop.set()
        thread.join(5)
