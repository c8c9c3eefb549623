"""View versions' states: which version serves, when an older one is retired (pure code)."""

from __future__ import annotations

import dataclasses

from features.versions import ViewState, retirable, serving_version
from schemas.definitions import Project
from tests.unit.test_features import ALL_KINDS, PER_SHOP

V1 = ALL_KINDS
V2 = dataclasses.replace(ALL_KINDS, window="2h", version=2)


def project() -> Project:
    base = Project.of("visits_project", [V2, PER_SHOP])
    return dataclasses.replace(base, previous_views={V1.ref: V1})


def test_the_serving_version_is_the_newest_live_one() -> None:
    p = project()
    assert serving_version(p, {}, "all_kinds") is None  # nothing live yet: a model waits
    backfilling = {"all_kinds@1": ViewState("live", 1), "all_kinds@2": ViewState("backfilling", 2)}
    assert serving_version(p, backfilling, "all_kinds") == V1
    both = {**backfilling, "all_kinds@2": ViewState("live", 3)}
    assert serving_version(p, both, "all_kinds") == V2
    assert serving_version(p, both, "per_shop") is None


def test_an_older_version_retires_once_the_newest_is_live_and_no_model_needs_it() -> None:
    p = project()  # no model reads the view
    live_v1 = {"all_kinds@1": ViewState("live", 1)}
    assert retirable(p, {**live_v1, "all_kinds@2": ViewState("backfilling", 2)}, {}) == []
    live = {**live_v1, "all_kinds@2": ViewState("live", 3)}
    assert retirable(p, live, {}) == [V1]
    assert retirable(p, {**live, "all_kinds@1": ViewState("retired", 4)}, {}) == []
