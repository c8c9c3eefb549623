"""The food-delivery example: its definitions load, its generator repeats per seed and carries a signal,
and its learner finds that signal from the features Tide would serve."""

from __future__ import annotations

import json
from collections import defaultdict, deque
from pathlib import Path
from statistics import fmean
from typing import Any

import pytest
from fastavro import parse_schema
from fastavro.validation import validate

from examples.food_delivery.driver.generator import GeneratorConfig, OrderGenerator
from examples.food_delivery.driver.traffic import score_body
from infra.imports import import_object
from schemas.definitions import Project
from tide.plan import check_factories
from tide.project import load_project

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "food_delivery"


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(FOLDER)


class Clock:
    """Simulated time: ``rate`` orders a second, as the demo sends them."""

    def __init__(self, rate: float) -> None:
        self.now, self.step = 1_800_000_000.0, 1.0 / rate

    def tick(self) -> None:
        self.now += self.step

    def __call__(self) -> float:
        return self.now


def take(gen: OrderGenerator, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    orders, deliveries = [], []
    for _ in range(n):
        order, due = gen.next()
        orders.append(order)
        deliveries.extend(due)
    return orders, deliveries


def test_project_loads_and_validates(project: Project) -> None:
    assert project.name == "food_delivery"
    model = project.models["eta"]
    assert model.task == "regression" and model.metric_name == "MAE"
    entities = {v.entity.name for v in project.model_views(model)}
    assert entities == {"restaurant", "courier"}
    # Two of its views are computed from the labels stream itself.
    assert model.labels is not None
    assert {v.name for v in project.views.values() if v.source.name == model.labels.source.name} == {
        "restaurant_history",
        "courier_history",
    }
    categorical = [f for f in model.request_fields if model.request.fields[f] == "string"]
    assert categorical == ["cuisine", "daypart", "vehicle"]
    assert Project.from_dict(json.loads(project.canonical_json())).digest() == project.digest()
    check_factories(project)  # the learner imports, learns a sample and predicts it


def test_records_match_their_schemas_and_deliveries_come_later(project: Project) -> None:
    gen = OrderGenerator(GeneratorConfig(label_delay=40), clock=lambda: 1000.0)
    orders, deliveries = take(gen, 400)
    order_schema = parse_schema(dict(project.sources["orders"].parsed))
    delivered_schema = parse_schema(dict(project.sources["deliveries"].parsed))
    for o in orders:
        validate(o, order_schema, raise_errors=True)
    for d in deliveries:
        validate(d, delivered_schema, raise_errors=True)
    seq = {o["order_id"]: o["seq"] for o in orders}
    assert [seq[d["order_id"]] for d in deliveries] == list(range(360))
    assert len(gen.drain()) == 40
    body = score_body(orders[0], project.models["eta"].request_fields)
    assert set(body["entities"]) == {v.entity_key for v in project.model_views(project.models["eta"])}


def test_seeded_streams_repeat() -> None:
    a = take(OrderGenerator(GeneratorConfig(seed=5), clock=lambda: 0.0), 300)
    b = take(OrderGenerator(GeneratorConfig(seed=5), clock=lambda: 0.0), 300)
    c = take(OrderGenerator(GeneratorConfig(seed=6), clock=lambda: 0.0), 300)
    assert a == b
    assert a != c


def progressive(n: int, rate: float = 200.0, label_delay: int = 300) -> tuple[list[float], list[float]]:
    """Absolute errors of the learner and of the naive estimate (the mean of known deliveries), each
    order estimated from the features Tide would serve when it is placed and learnt once delivered."""
    clock = Clock(rate)
    gen = OrderGenerator(GeneratorConfig(label_delay=label_delay), clock=clock)
    model = import_object("eta_model:new_model")()
    restaurants: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    couriers: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    kitchens: dict[str, deque[int]] = defaultdict(deque)
    known = [0.0, 0]
    waiting: dict[str, tuple[dict[str, Any], float, float]] = {}
    errors, naive_errors = [], []
    for _ in range(n):
        clock.tick()
        order, due = gen.next()
        kitchen = kitchens[order["restaurant_id"]]
        while kitchen and kitchen[0] <= order["ts"] - 60_000:
            kitchen.popleft()
        r, c = restaurants[order["restaurant_id"]], couriers[order["courier_id"]]
        x = {f: order[f] for f in ("cuisine", "daypart", "vehicle", "distance_km", "items")}
        x |= {
            "restaurant_orders_1m": len(kitchen),
            "restaurant_minutes_7d": r[0] / r[1] if r[1] else 0.0,
            "restaurant_deliveries_7d": r[1],
            "courier_pace": c[0] / c[1] if c[1] else 0.0,
            "courier_deliveries": c[1],
        }
        kitchen.append(order["ts"])
        waiting[order["order_id"]] = (x, model.predict_one(x), known[0] / known[1] if known[1] else 0.0)
        for d in due:
            x0, estimate, naive = waiting.pop(d["order_id"])
            errors.append(abs(estimate - d["minutes"]))
            naive_errors.append(abs(naive - d["minutes"]))
            model.learn_one(x0, d["minutes"])
            restaurants[d["restaurant_id"]][0] += d["minutes"]
            restaurants[d["restaurant_id"]][1] += 1
            couriers[d["courier_id"]][0] += d["pace_min_per_km"]
            couriers[d["courier_id"]][1] += 1
            known[0] += d["minutes"]
            known[1] += 1
    return errors, naive_errors


def test_learner_learns_the_generators_signal(project: Project) -> None:
    errors, naive = progressive(6000)
    assert len(errors) == 6000 - 300
    # Over everything (the first estimates included) and, clearly, once it has seen some deliveries.
    assert fmean(errors) < 0.75 * fmean(naive)
    assert fmean(errors[-2000:]) < 0.5 * fmean(naive[-2000:])
