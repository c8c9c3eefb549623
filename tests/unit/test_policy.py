"""Model policies: defaults only report, bad values name the model and field, the registry form round-trips,
and a policy change is additive."""

from __future__ import annotations

from typing import Any

import pytest

from infra.errors import DefinitionError
from schemas.definitions import Labels, Model, Source
from schemas.policy import Canary, Drift, Policy, Retrain

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "test",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "value", "type": "double"},
        {"name": "faulty", "type": "boolean"},
        {"name": "ts", "type": "long"},
    ],
}
SOURCE = Source("readings", SCHEMA, key="reading_id", event_time="ts")
LABELS = Labels("outcomes", SOURCE, key="reading_id", target="faulty", task="binary")


def model(**overrides: Any) -> Model:
    args: dict[str, Any] = {
        "name": "scorer",
        "task": "binary",
        "request": SOURCE,
        "request_fields": ["value"],
        "labels": LABELS,
        "learner": "pkg.mod:factory",
    }
    return Model(**{**args, **overrides})


def test_the_default_policy_only_reports() -> None:
    policy = model().policy
    assert policy == Policy()
    assert (policy.canary.promote, policy.canary.rollback, policy.retrain.on) == (False, False, ())


def test_an_undeclared_policy_leaves_the_registry_form_and_its_digest_alone() -> None:
    assert "policy" not in model().to_dict()
    declared = model(policy=Policy(retrain=Retrain(on=("concept",))))
    assert declared.to_dict()["policy"]["retrain"]["on"] == ["concept"]


def test_the_registry_form_round_trips() -> None:
    policy = Policy(
        canary=Canary(margin=0.02, promote=True, rollback=True, min_labels=50),
        drift=Drift(false_alarm_rate=1e-4, cooldown_checks=3, concept=False),
        retrain=Retrain(on=("drift", "concept"), window=500, min_value=0.6, max_regression=0.01),
    )
    m = model(policy=policy)
    again = Model.from_dict(m.to_dict(), {"readings": SOURCE}, {"outcomes": LABELS})
    assert again.policy == policy


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (Policy(canary=Canary(alpha=0.9)), "'alpha'"),
        (Policy(canary=Canary(min_labels=0)), "'min_labels'"),
        (Policy(canary=Canary(min_duration_s=60, max_duration_s=10)), "'max_duration_s'"),
        (Policy(drift=Drift(false_alarm_rate=0.5)), "'false_alarm_rate'"),
        (Policy(retrain=Retrain(on=("weather",))), "'on[0]'"),
        (Policy(retrain=Retrain(window=True)), "'window'"),  # type: ignore[arg-type]
        (Policy(retrain=Retrain(max_regression=-1)), "'max_regression'"),
    ],
)
def test_a_bad_value_names_the_model_the_part_and_the_field(policy: Policy, field: str) -> None:
    with pytest.raises(DefinitionError) as err:
        model(policy=policy)
    assert "model 'scorer'" in str(err.value) and "policy." in str(err.value) and field in str(err.value)


def test_unknown_fields_in_the_registry_form_are_refused() -> None:
    with pytest.raises(DefinitionError, match=r"policy.canary: unknown fields \['promte'\]"):
        Policy.from_dict({"canary": {"promte": True}})


def test_a_policy_that_is_not_one_is_refused() -> None:
    with pytest.raises(DefinitionError, match="field 'policy': must be a Policy"):
        model(policy={"canary": {}})


def test_declaring_or_changing_a_policy_is_additive() -> None:
    from schemas.definitions import Project
    from tide.diff import diff

    def project(m: Model) -> Project:
        return Project("p", sources={"readings": SOURCE}, labels={"outcomes": LABELS}, models={m.name: m})

    before = project(model())
    after = project(model(policy=Policy(canary=Canary(promote=True))))
    changes = [c for c in diff(before, after) if c["kind"] == "models"]
    assert [(c["change"], c["class"]) for c in changes] == [("changed", "additive")]
    assert "policy" in changes[0]["detail"]
