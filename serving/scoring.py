"""Scoring one request: online features in one round trip, one model object, one logged prediction each.

The model is read from the registry once by the caller and passed in, so a hot swap during the request
never mixes versions within it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from features.definitions import CARD_ACTIVITY, FeatureView
from features.store import FeatureRow
from infra.errors import Unavailable
from serving.features import assemble
from serving.runtime import LoadedModel
from serving.validation import ScoreRequest

logger = logging.getLogger(__name__)

ARM_CHAMPION = "champion"


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
        rows = await asyncio.wait_for(store.read(CARD_ACTIVITY, unique), timeout_s)
    except TimeoutError:
        raise Unavailable(f"online feature read took longer than {timeout_s} s", status=504) from None
    except Exception as exc:
        logger.warning("online feature read failed: %s: %s", type(exc).__name__, exc)
        raise Unavailable("online feature store unavailable", retry_after=1) from exc
    return {row.entity: row for row in rows}


async def score(
    model: LoadedModel,
    instances: Sequence[ScoreRequest],
    *,
    store: FeatureReader,
    predlog: PredictionSink,
    timeout_s: float,
    request_ids: Sequence[str],
    started: float,
) -> list[dict[str, Any]]:
    """Score ``instances`` with ``model``; returns one response item each and logs one prediction each.

    ``started`` is the request's ``time.perf_counter()`` at arrival; latency is measured from it.
    """
    rows = await read_features(store, [i.entity for i in instances], timeout_s)
    scored = []
    for inst in instances:
        row = rows[inst.entity]
        x = assemble(inst.fields, row)
        scored.append((inst, row, x, model.runtime.predict_one(x)))
    latency_ms = (time.perf_counter() - started) * 1000
    ts = int(time.time() * 1000)
    out = []
    for (inst, row, x, value), request_id in zip(scored, request_ids, strict=True):
        predlog.log(
            {
                "request_id": request_id,
                "event_id": inst.event_id,
                "entity": inst.entity,
                "model": model.name,
                "version": model.version,
                "arm": ARM_CHAMPION,
                "features": x,
                "score": value,
                "latency_ms": latency_ms,
                "ts": ts,
            }
        )
        out.append(
            {
                "request_id": request_id,
                "model": model.name,
                "version": model.version,
                "score": value,
                "arm": ARM_CHAMPION,
                "features": x,
                "feature_status": row.status,
                "feature_age_ms": row.age_ms,
            }
        )
    return out
