"""``tide models list|show|history``: the model registry as the topics record it.

The models, deployments, canary-verdicts and drift-alerts topics are read from the beginning and
replayed through serving's own registry (:class:`serving.registry.ModelRegistry`: the traffic policy,
blessing and deployment outcomes a serving node computes), so the champion shown is the one a node that
read the same records serves, and each deployment's outcome (applied, refused and why, or still pending
for a version not published) is the one a node gives: one held longer than a node holds it
(``TIDE_SERVE_DEPLOYMENT_PENDING_S`` since its record's time) shows refused, as a node would have it.
Nothing is loaded: versions are not scored here.

::

    list              every model: champion, newest version, each version's blessing, deployments pending
    show NAME         one model's versions with their lineage and status (as GET /v1/models/{name}/versions)
    history NAME      one model's events in time order: versions published (with blessing), deployments
                      (source, reason, outcome), canary verdicts and drift alerts
"""

from __future__ import annotations

import argparse
import heapq
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infra.console import AddCommand, emit, setup_logging
from infra.errors import ConfigError, DeploymentError, SchemaError
from infra.settings import CommonSettings, load

if TYPE_CHECKING:
    from serving.registry import ModelRegistry

logger = logging.getLogger(__name__)

TOPIC_NAMES = ("models", "deployments", "canary-verdicts", "drift-alerts")
_TS_FIELD = {"model_version": "created_ts"}  # the others: ts


@dataclass
class Replay:
    """The registry after every record, and each model's records in time order."""

    registry: ModelRegistry = field(default_factory=lambda: _registry())
    records: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, record: dict[str, Any]) -> None:
        name = str(record.get("model"))
        if kind == "model_version":
            self.registry.remember(record)
        elif kind == "deployment":
            try:
                outcome = self.registry.deploy(record)
            except DeploymentError as exc:
                logger.warning("invalid deployment record of model %s: %s", name, exc)
                return
            record = {**record, "id": outcome["id"]}
        elif kind == "canary_verdict":
            self.registry.verdict(record)
        elif kind != "drift_alert":
            return
        self.records[name].append((kind, record))

    def models(self) -> list[str]:
        return sorted(self.records)


def _registry() -> ModelRegistry:
    # Not imported by the CLI until a models command runs.
    from serving.registry import ModelRegistry
    from serving.settings import ServeSettings

    # A deployment still held for its version is refused once a node would have refused it.
    return ModelRegistry(pending_s=load(ServeSettings).serve_deployment_pending_s)


def _read(settings: CommonSettings, name: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    from infra.kafka import read_to_end
    from infra.topics import TOPICS, topic
    from schemas import codec

    for msg in read_to_end(settings, topic(settings, name), TOPICS[name].partitions):
        try:
            kind, record = codec.decode_named(msg.value() or b"")
        except SchemaError as exc:
            logger.warning("skipping an undecodable record of %s: %s", name, exc)
            continue
        yield int(record.get(_TS_FIELD.get(kind, "ts")) or 0), kind, record


def replay(settings: CommonSettings) -> Replay:
    """Read the four topics to their end and replay them, merged in time order (each topic's own order
    kept)."""
    streams = [list(_read(settings, name)) for name in TOPIC_NAMES]
    out = Replay()
    for _ts, kind, record in heapq.merge(*streams, key=lambda item: item[0]):
        out.add(kind, record)
    out.registry.expire(at_ms=int(time.time() * 1000))
    return out


def _blessing(summary: dict[str, Any]) -> dict[str, Any]:
    blessing = summary.get("blessing")
    if blessing is None:
        return {"blessed": True, "reason": "not evaluated (versions older than blessing count as blessed)"}
    return {"blessed": bool(blessing.get("blessed")), "reason": blessing.get("reason")}


def list_models(state: Replay) -> list[dict[str, Any]]:
    described = {m["name"]: m for m in state.registry.describe()}
    out = []
    for name in state.models():
        versions = state.registry.versions(name) or []
        out.append(
            {
                "name": name,
                "champion": state.registry.champion_version(name),
                "newest": max((v["version"] for v in versions), default=None),
                "newest_blessed": described.get(name, {}).get("newest"),
                "versions": {str(v["version"]): _blessing(v) for v in versions},
                "pending_deployments": len(described.get(name, {}).get("pending", [])),
            }
        )
    return out


def show_model(state: Replay, name: str) -> dict[str, Any]:
    if name not in state.records:
        raise ConfigError(f"no records of model {name!r} (models: {', '.join(state.models()) or 'none'})")
    described = next(m for m in state.registry.describe() if m["name"] == name)
    return {
        "model": name,
        "champion": state.registry.champion_version(name),
        "policy": described["policy"],
        "versions": state.registry.versions(name) or [],
    }


def history(state: Replay, name: str) -> list[dict[str, Any]]:
    if name not in state.records:
        raise ConfigError(f"no records of model {name!r} (models: {', '.join(state.models()) or 'none'})")
    outcomes = {d["id"]: d for d in state.registry.deployments(name) or []}
    events = []
    for kind, r in state.records[name]:
        if kind == "model_version":
            event = {
                "ts": r["created_ts"],
                "event": "version",
                "version": r["version"],
                **{f"blessing_{k}": v for k, v in _blessing(r).items()},
                "parent_version": r.get("parent_version"),
                "trigger": r.get("trigger"),
                "metric_name": r.get("metric_name"),
                "metric_value": r.get("metric_value"),
            }
        elif kind == "deployment":
            outcome = outcomes.get(r["id"], {})
            event = {
                "ts": r["ts"],
                "event": "deployment",
                "id": r["id"],
                "action": r["action"],
                "version": r.get("version"),
                "weight": r.get("weight"),
                "source": r.get("source"),
                "reason": r.get("reason"),
                "status": outcome.get("status"),
                "status_reason": outcome.get("status_reason"),
            }
        elif kind == "canary_verdict":
            keys = ("verdict_id", "version", "champion_version", "arm", "outcome", "rule", "metric")
            more = ("estimate", "lower", "upper", "margin", "n", "action", "final")
            event = {"ts": r["ts"], "event": "verdict", **{k: r.get(k) for k in (*keys, *more)}}
        else:
            fields: tuple[str, ...] = (
                "alert_id",
                "version",
                "kind",
                "feature",
                "statistic",
                "value",
                "threshold",
            )
            fields += ("p_value", "estimate_before", "estimate_after", "delay_records", "arm")
            event = {"ts": r["ts"], "event": "drift_alert", **{k: r.get(k) for k in fields}}
        events.append(event)
    return sorted(events, key=lambda e: e["ts"])


def cmd_models(args: argparse.Namespace) -> int:
    settings = load(CommonSettings)
    setup_logging(settings.log_level)
    if args.action != "list" and not args.name:
        raise ConfigError(f"models {args.action} needs a model NAME")
    state = replay(settings)
    if args.action == "list":
        emit({"models": list_models(state)})
    elif args.action == "show":
        emit(show_model(state, args.name))
    else:
        emit({"model": args.name, "events": history(state, args.name)})
    return 0


def add_commands(add: AddCommand) -> None:
    mo = add(
        "models",
        cmd_models,
        "The model registry as the topics record it: `list` (every model's champion, newest version and "
        "blessings), `show NAME` (versions with lineage, blessing, verdicts and status), `history NAME` "
        "(versions, deployments with their outcome, verdicts and drift alerts in time order). JSON.",
    )
    mo.add_argument("action", choices=("list", "show", "history"))
    mo.add_argument("name", nargs="?", default=None, help="model name (show, history)")
