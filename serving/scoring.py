"""Scoring one request: online features in one round trip, one routing, one logged prediction each.

The routing (champion, canary, shadow, and the inputs each is scored with) is read from the registry
once by the caller and passed in, so a hot swap, a deployment or a change of definitions during the
request never mixes policies within it. Each version reads the view versions of its own lineage
(:mod:`serving.lineage`); every ``(view version, entity)`` pair the request's instances need, whatever
their views, versions and entities (the shadow's included), is read in one store call.
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


# The rows a request read, by (view version, entity value): views compare by name and version.
Found = Mapping[Pair, FeatureRow]


@dataclass(frozen=True)
class Routed:
    """Who answers one instance: the version, its arm, and the inputs it is scored with."""

    model: LoadedModel
    arm: str
    inputs: ModelInputs


def route(routing: Routing, default: ModelInputs, instances: Sequence[ScoreRequest]) -> list[Routed]:
    """Each instance's arm (sticky per entity values, by the join keys of ``default``: the model's
    definition) and the inputs of the version that answers it."""
    out = []
    for inst in instances:
        model, arm = routing.pick(default.entity_key(inst.entities))
        out.append(Routed(model, arm, routing.inputs_of(model, default)))
    return out


async def read_features(
    store: FeatureReader, reads: Sequence[tuple[ModelInputs, ScoreRequest]], timeout_s: float
) -> dict[Pair, FeatureRow]:
    """The rows every ``(inputs, instance)`` read needs, each distinct pair read once, in one store call
    bounded by ``timeout_s``."""
    unique = list(dict.fromkeys(pair for inputs, inst in reads for pair in inputs.pairs(inst.entities)))
    if not unique:
        return {}
    try:
        async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for
            rows = await store.read_pairs(unique)
    except TimeoutError:
        raise Unavailable(f"online feature read took longer than {timeout_s} s", status=504) from None
    except Exception as exc:
        logger.warning("online feature read failed: %s: %s", type(exc).__name__, exc)
        raise Unavailable("online feature store unavailable", retry_after=1) from exc
    return dict(zip(unique, rows, strict=True))


def rows_of(inputs: ModelInputs, inst: ScoreRequest, found: Found) -> dict[str, FeatureRow]:
    """The rows ``inputs`` reads for ``inst``, by view name (one version of each view)."""
    return {view.name: found[(view, entity)] for view, entity in inputs.pairs(inst.entities)}


def assemble(inputs: ModelInputs, inst: ScoreRequest, rows: Mapping[str, FeatureRow]) -> dict[str, Any]:
    """The exact input ``inputs`` scores: its own request fields (a version may have been trained on
    fewer than the model's definition holds now) and features."""
    fields = inst.fields
    if len(inputs.request_fields) != len(fields):
        fields = {f.name: fields[f.name] for f in inputs.request_fields}
    return inputs.assemble(fields, rows)


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
    routed: Sequence[Routed],
    instances: Sequence[ScoreRequest],
    found: Found,
    request_ids: Sequence[str],
) -> list[Scored]:
    """Score each instance with the version it was routed to (:func:`route`), on the rows of that
    version's view versions.

    A batch is scored with one model call per version that answers part of it.
    """
    rows = [rows_of(r.inputs, inst, found) for r, inst in zip(routed, instances, strict=True)]
    xs = [assemble(r.inputs, inst, rs) for r, inst, rs in zip(routed, instances, rows, strict=True)]
    outputs = _predict([r.model for r in routed], xs)
    return [
        Scored(inst, request_id, rs, x, r.model, r.arm, out)
        for inst, request_id, rs, x, r, out in zip(
            instances, request_ids, rows, xs, routed, outputs, strict=True
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


def shadow(
    model: LoadedModel, inputs: ModelInputs, scored: Sequence[Scored], found: Found, predlog: PredictionSink
) -> None:
    """Mirror a request to the shadow version: score the same instances on its own inputs (``inputs``:
    its lineage; the rows were read with the request's), log them, return nothing.

    Runs after the response has been sent; a shadow failure is logged and never reaches the client.
    """
    started = time.perf_counter()
    try:
        rows = [rows_of(inputs, s.request, found) for s in scored]
        xs = [assemble(inputs, s.request, r) for s, r in zip(scored, rows, strict=True)]
        outputs = _predict([model] * len(scored), xs)
        mirrored = [
            dataclasses.replace(s, rows=r, x=x, model=model, arm=ARM_SHADOW, output=out)
            for s, r, x, out in zip(scored, rows, xs, outputs, strict=True)
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
