"""Scoring one request: online features in one round trip, one routing, one logged prediction each.

The routing (champion, canary, shadow) is read from the registry once by the caller and passed in, so a
hot swap or a deployment during the request never mixes policies within it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.definitions import CARD_ACTIVITY, FeatureView
from features.store import FeatureRow
from infra.errors import Unavailable
from serving.deployments import ARM_SHADOW, Routing
from models.inputs import assemble
from models.runtime import LoadedModel
from serving.validation import ScoreRequest

logger = logging.getLogger(__name__)


class FeatureReader(Protocol):
    """What scoring needs of the online store (:class:`features.store.RedisOnlineStore` is one)."""

    async def read(self, view: FeatureView, entities: Sequence[str]) -> list[FeatureRow]: ...


class PredictionSink(Protocol):
    """Where served predictions go (:class:`serving.predlog.PredictionLog` is one). Must not block."""

    def log(self, record: Mapping[str, Any]) -> None: ...


async def read_features(
    store: FeatureReader, entities: Sequence[str], timeout_s: float
) -> dict[str, FeatureRow]:
    """Online features of every distinct entity, in one store round trip bounded by ``timeout_s``."""
    unique = list(dict.fromkeys(entities))
    try:
        async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for
            rows = await store.read(CARD_ACTIVITY, unique)
    except TimeoutError:
        raise Unavailable(f"online feature read took longer than {timeout_s} s", status=504) from None
    except Exception as exc:
        logger.warning("online feature read failed: %s: %s", type(exc).__name__, exc)
        raise Unavailable("online feature store unavailable", retry_after=1) from exc
    return {row.entity: row for row in rows}


@dataclass(frozen=True)
class Scored:
    """One instance as served: what it was scored from and by whom."""

    request: ScoreRequest
    request_id: str
    row: FeatureRow
    x: dict[str, Any]
    model: LoadedModel
    arm: str
    score: float


def score(
    routing: Routing,
    instances: Sequence[ScoreRequest],
    rows: Mapping[str, FeatureRow],
    request_ids: Sequence[str],
) -> list[Scored]:
    """Score each instance with the arm its entity routes to (one routing for the whole request).

    A batch is scored with one model call per version that answers part of it.
    """
    picks = [routing.pick(inst.entity) for inst in instances]
    xs = [assemble(inst.fields, rows[inst.entity]) for inst in instances]
    scores = _predict([model for model, _ in picks], xs)
    return [
        Scored(inst, request_id, rows[inst.entity], x, model, arm, value)
        for inst, request_id, x, (model, arm), value in zip(
            instances, request_ids, xs, picks, scores, strict=True
        )
    ]


def _predict(models: Sequence[LoadedModel], xs: Sequence[dict[str, Any]]) -> list[float]:
    if len(xs) == 1:
        return [models[0].runtime.predict_one(xs[0])]
    groups: dict[int, list[int]] = {}
    for i, model in enumerate(models):
        groups.setdefault(id(model), []).append(i)
    scores = [0.0] * len(xs)
    for indexes in groups.values():
        values = models[indexes[0]].runtime.predict_many([xs[i] for i in indexes])
        for i, value in zip(indexes, values, strict=True):
            scores[i] = value
    return scores


def log_predictions(predlog: PredictionSink, scored: Sequence[Scored], latency_ms: float) -> None:
    """One prediction record per scored instance, with the exact features and the arm that answered."""
    ts = int(time.time() * 1000)
    for s in scored:
        predlog.log(
            {
                "request_id": s.request_id,
                "event_id": s.request.event_id,
                "entity": s.request.entity,
                "model": s.model.name,
                "version": s.model.version,
                "arm": s.arm,
                "features": s.x,
                "score": s.score,
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
        values = _predict([model] * len(scored), [s.x for s in scored])
        mirrored = [
            dataclasses.replace(s, model=model, arm=ARM_SHADOW, score=value)
            for s, value in zip(scored, values, strict=True)
        ]
    except Exception:
        logger.exception("shadow model %s version %d failed to score", model.name, model.version)
        return
    log_predictions(predlog, mirrored, (time.perf_counter() - started) * 1000)


def response_item(s: Scored) -> dict[str, Any]:
    return {
        "request_id": s.request_id,
        "model": s.model.name,
        "version": s.model.version,
        "arm": s.arm,
        "score": s.score,
        "features": s.x,
        "feature_status": s.row.status,
        "feature_age_ms": s.row.age_ms,
    }
