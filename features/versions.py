"""View versions' states in Redis: which are backfilling, live or retired, and the retirement rule.

Hash ``{ns}tide:views``: field = view ref ``name@version``, value = JSON ``{"state": "backfilling" |
"live" | "retired", "ts": ms, "progress": {"topic:partition": [position, target]}}``. The feature
processor alone writes it (:class:`StateWriter`); trainers and serving read it (:func:`read_states`,
:func:`serving_version`): a model trains on, for each view it reads, the newest version that is live.

A version is live once its backfill has reached the live position of every partition of its source
(a new project over empty topics: at once). An older version is retired once the view's newest version
is live and every model that reads the view has a published model version (``models`` topic, field
``view_versions``) naming a newer version of it (:func:`retirable`); the processor then stops computing
it and makes its keys expire (:func:`expire_view`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from features.store import positions_key, view_key_pattern
from infra.settings import CommonSettings
from infra.topics import TOPICS, topic
from schemas import codec
from schemas.definitions import FeatureView, Project

log = logging.getLogger(__name__)

State = Literal["backfilling", "live", "retired"]
STATE_SCRIPT = (Path(__file__).with_name("lua") / "state.lua").read_text()
SCAN_COUNT = 1000


@dataclass(frozen=True)
class ViewState:
    """One view version's state, when it took it (ms) and its progress per source partition
    (``"topic:partition"`` -> (position reached, live position to reach))."""

    state: State
    ts: int
    progress: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def views_key(namespace: str) -> str:
    return f"{namespace}tide:views"


def read_states(client: redis.Redis, namespace: str) -> dict[str, ViewState]:
    """Every view version's state, by view ref."""
    out = {}
    for ref, raw in client.hgetall(views_key(namespace)).items():
        doc = orjson.loads(raw)
        progress = {p: (int(v[0]), int(v[1])) for p, v in (doc.get("progress") or {}).items()}
        name = ref.decode() if isinstance(ref, bytes) else ref
        out[name] = ViewState(doc["state"], int(doc["ts"]), progress)
    return out


def serving_version(project: Project, states: Mapping[str, ViewState], view_name: str) -> FeatureView | None:
    """The newest version of ``view_name`` that is live (None when none is live yet)."""
    versions = [v for v in project.view_versions.values() if v.name == view_name]
    live = [v for v in versions if (s := states.get(v.ref)) is not None and s.state == "live"]
    return max(live, key=lambda v: v.version) if live else None


def retirable(
    project: Project, states: Mapping[str, ViewState], named: Mapping[str, Mapping[str, int]]
) -> list[FeatureView]:
    """The older view versions to retire: the view's newest version is live and every model of the
    project that reads the view has published a version naming a newer version of it (``named``: model
    -> view -> the newest version any of its published versions names)."""
    out = []
    for ref, view in project.previous_views.items():
        state = states.get(ref)
        if state is not None and state.state == "retired":
            continue
        newest = project.views.get(view.name)
        if newest is None or newest.version <= view.version:
            continue
        newest_state = states.get(newest.ref)
        if newest_state is None or newest_state.state != "live":
            continue
        readers = [m.name for m in project.models.values() if any(v == view.name for v, _ in m.feature_refs)]
        if all(named.get(m, {}).get(view.name, 0) > view.version for m in readers):
            out.append(view)
    return out


class StateWriter:
    """Writes view versions' progress and states (the feature processor's side)."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self._script = client.register_script(STATE_SCRIPT)

    def report(self, view: FeatureView, progress: Mapping[str, tuple[int, int]], partitions: int) -> State:
        """Records ``view``'s progress on some partitions of its source (which has ``partitions``);
        returns its state after it (live once every partition reached its target)."""
        doc = orjson.dumps({p: list(v) for p, v in progress.items()})
        now = int(time.time() * 1000)
        state = self._script(keys=[views_key(self.namespace)], args=[view.ref, doc, partitions, now, ""])
        return _text(state)  # type: ignore[return-value]

    def retire(self, view: FeatureView) -> None:
        now = int(time.time() * 1000)
        self._script(keys=[views_key(self.namespace)], args=[view.ref, b"{}", 0, now, "retire"])


def mark_live(client: redis.Redis, namespace: str, refs: Sequence[str]) -> None:
    """Marks view versions live without a backfill: for a run with no feature processor (a benchmark of
    the trainer alone, tests), where every view version is as good as caught up."""
    if refs:
        doc = orjson.dumps({"state": "live", "ts": int(time.time() * 1000), "progress": {}})
        client.hset(views_key(namespace), mapping=dict.fromkeys(refs, doc))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def expire_view(client: redis.Redis, view: FeatureView, namespace: str, after_ms: int) -> int:
    """Makes every key of this version of ``view`` expire in ``after_ms`` (SCAN over its key pattern,
    PEXPIRE in pipelines); returns how many keys."""
    n = 0
    batch: list[bytes] = []

    def flush() -> None:
        with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.pexpire(key, after_ms)
            pipe.execute()
        batch.clear()

    for key in client.scan_iter(match=view_key_pattern(view, namespace), count=SCAN_COUNT):
        batch.append(key)
        n += 1
        if len(batch) >= SCAN_COUNT:
            flush()
    batch.append(positions_key(view, namespace).encode())
    flush()
    return n


class ModelLineage:
    """Follows the ``models`` topic (no consumer group, from the beginning): per model, per view, the
    newest view version any of its published versions names (field ``view_versions``)."""

    def __init__(self, settings: CommonSettings) -> None:
        name = topic(settings, "models")
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": "tide-reader-unused",  # required by librdkafka, never joined: we assign
                "enable.auto.commit": False,
            }
        )
        partitions = TOPICS["models"].partitions
        self.consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.named: dict[str, dict[str, int]] = {}

    def poll(self, max_records: int = 1000) -> bool:
        """Reads what arrived (not waiting); True when something changed."""
        changed = False
        for msg in self.consumer.consume(max_records, 0):
            err = msg.error()
            if err is not None:
                if err.code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    log.warning("models topic: %s", err)
                continue
            try:
                record = codec.decode(msg.value() or b"", "model_version")
            except Exception as exc:  # not ours to dead-letter: the registry's readers report it
                log.warning("undecodable model version at offset %s: %s", msg.offset(), exc)
                continue
            views = self.named.setdefault(str(record["model"]), {})
            for view, version in (record.get("view_versions") or {}).items():
                if int(version) > views.get(view, 0):
                    views[view] = int(version)
                    changed = True
        return changed

    def close(self) -> None:
        self.consumer.close()
