"""Scoring one request: online features in one round trip, one routing, one logged prediction each.

The routing (champion, canary, shadow) is read from the registry once by the caller and passed in, so a
hot swap or a deployment during the request never mixes policies within it. Every ``(view, entity)``
pair the request's instances need, whatever their views and entities, is read in one store call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from features.store import FeatureRow
from infra.errors import Unavailable
from models.base import Output
from models.inputs import ModelInputs
from models.runtime import LoadedModel
from schemas.definitions import FeatureView
from serving.deployments import ARM_SHADOW, Routing
from serving.validation import ScoreRequest

logger = logging.getLogger(__name__)

Pair = tuple[FeatureView, str]


class FeatureReader(Protocol):
    """What scoring needs of the online store (:class:`features.store.RedisOnlineStore` is one)."""

    async def read_pairs(self, pairs: Sequence[Pair]) -> list[FeatureRow]: ...


class PredictionSink(Protocol):
    """Where served predictions go (:class:`serving.predlog.PredictionLog` is one). Must not block."""

    def log(self, record: Mapping[str, Any]) -> None: ...


async def read_features(
    store: FeatureReader, inputs: ModelInputs, instances: Sequence[ScoreRequest], timeout_s: float
) -> list[dict[str, FeatureRow]]:
    """Each instance's rows by view name, every distinct pair read once, in one store call bounded by
    ``timeout_s``."""
    if not inputs.views:
        return [{} for _ in instances]
    wanted = [inputs.pairs(inst.entities) for inst in instances]
    unique = list(
        {(view.name, entity): (view, entity) for pairs in wanted for view, entity in pairs}.values()
    )
    try:
        async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for
            rows = await store.read_pairs(unique)
    except TimeoutError:
        raise Unavailable(f"online feature read took longer than {timeout_s} s", status=504) from None
    except Exception as exc:
        logger.warning("online feature read failed: %s: %s", type(exc).__name__, exc)
        raise Unavailable("online feature store unavailable", retry_after=1) from exc
    found = {(view.name, entity): row for (view, entity), row in zip(unique, rows, strict=True)}
    return [{view.name: found[(view.name, entity)] for view, entity in pairs} for pairs in wanted]


@dataclass(frozen=True)
class Scored:
    """One instance as served: what it was scored from and by whom."""

    request: ScoreRequest
    request_id: str
    rows: dict[str, FeatureRow]  # by view name
    x: dict[str, Any]
    model: LoadedModel
    arm: str
    output: Output


def score(
    routing: Routing,
    inputs: ModelInputs,
    instances: Sequence[ScoreRequest],
    rows: Sequence[dict[str, FeatureRow]],
    request_ids: Sequence[str],
) -> list[Scored]:
    """Score each instance with the arm its entities route to (one routing for the whole request).

    A batch is scored with one model call per version that answers part of it.
    """
    picks = [routing.pick(inputs.entity_key(inst.entities)) for inst in instances]
    xs = [inputs.assemble(inst.fields, r) for inst, r in zip(instances, rows, strict=True)]
    outputs = _predict([model for model, _ in picks], xs)
    return [
        Scored(inst, request_id, r, x, model, arm, out)
        for inst, request_id, r, x, (model, arm), out in zip(
            instances, request_ids, rows, xs, picks, outputs, strict=True
        )
    ]


def _predict(models: Sequence[LoadedModel], xs: Sequence[dict[str, Any]]) -> list[Output]:
    if len(xs) == 1:
        return [models[0].runtime.predict_one(xs[0])]
    groups: dict[int, list[int]] = {}
    for i, model in enumerate(models):
        groups.setdefault(id(model), []).append(i)
    outputs: list[Output] = [Output(0.0)] * len(xs)
    for indexes in groups.values():
        answers = models[indexes[0]].runtime.predict_many([xs[i] for i in indexes])
        for i, answer in zip(indexes, answers, strict=True):
            outputs[i] = answer
    return outputs


def log_predictions(predlog: PredictionSink, scored: Sequence[Scored], latency_ms: float) -> None:
    """One prediction record per scored instance, with the exact inputs and the arm that answered."""
    ts = int(time.time() * 1000)
    for s in scored:
        out = s.output
        predlog.log(
            {
                "request_id": s.request_id,
                "event_id": s.request.event_id,
                "entities": s.request.entities,
                "model": s.model.name,
                "version": s.model.version,
                "arm": s.arm,
                "features": s.x,
                "score": out.score,
                "label": out.label,
                "probabilities": out.probabilities,
                "latency_ms": latency_ms,
                "ts": ts,
            }
        )


def shadow(model: LoadedModel, scored: Sequence[Scored], predlog: PredictionSink) -> None:
    """Mirror a request to the shadow version: score the same inputs, log them, return nothing.

    Runs after the response has been sent; a shadow failure is logged and never reaches the client.
    """
    started = time.perf_counter()
    try:
        outputs = _predict([model] * len(scored), [s.x for s in scored])
        mirrored = [
            dataclasses.replace(s, model=model, arm=ARM_SHADOW, output=out)
            for s, out in zip(scored, outputs, strict=True)
        ]
    except Exception:
        logger.exception("shadow model %s version %d failed to score", model.name, model.version)
        return
    log_predictions(predlog, mirrored, (time.perf_counter() - started) * 1000)


def response_item(s: Scored) -> dict[str, Any]:
    """The response for one instance: the answer, who gave it, and the inputs it was computed from
    (``feature_status`` and ``feature_age_ms`` per view read)."""
    out = s.output
    item: dict[str, Any] = {
        "request_id": s.request_id,
        "model": s.model.name,
        "version": s.model.version,
        "arm": s.arm,
        "score": out.score,
    }
    if out.probabilities is not None:
        item["label"] = out.label
        item["probabilities"] = out.probabilities
    item["entities"] = s.request.entities
    item["features"] = s.x
    item["feature_status"] = {view: row.status for view, row in s.rows.items()}
    item["feature_age_ms"] = {view: row.age_ms for view, row in s.rows.items()}
    return item
