"""The feature pipeline as a PyFlink DataStream job: the same Redis tiles as the feature processor.

Steps (each name is the operator's name in Flink's UI and in logs)::

    source -> key by partition -> admit (decode, lateness) -> event-time (WatermarkStrategy)
           -> key by (entity field, bucket) -> fold (batched store applies) -> stats
                               \\-> dead letters (undecodable or later than the allowed lateness)

Definitions: ``--definitions project.json``, the project's definitions as the registry holds them
(:meth:`schemas.definitions.Project.to_dict`, e.g. the ``body`` of the newest ``definitions`` record),
and ``--source NAME``, the source whose views the job keeps (default: the only source with views). Its
records are decoded with every schema version the document carries.

Inputs:

- ``--input events.jsonl`` (local mini-cluster, tests): one event per line, as JSON; the line's index is
  its position and the file is partition 0 of input ``--input-name`` (default: the file's stem).
- ``--kafka host:port [--topic T]`` (the compose image only: it needs the ``flink-sql-connector-kafka``
  jar, which is not obtainable on a development machine): Flink's Kafka SQL connector with the record's
  ``partition`` and ``offset`` metadata, Avro-decoded here; positions are the Kafka offsets. The topic
  defaults to the namespace + the source's topic.

Guarantees (docs/2026-11-21-flink.md):

- Exactly-once *effect* on the Redis tiles. Poison records (a field a view reads missing, null, of the
  wrong type, NaN or infinite; an event further ahead of the wall clock than the source's
  ``max_future_skew``) are dead letters, by the shared admission check (:mod:`features.admission`).
  Lateness is decided per source partition, in partition order, by the shared rule
  (:func:`features.tiles.split_late`), with the partition's watermark in Flink state.
  Entities are spread over ``--buckets`` stable hash buckets (crc32): an entity's records reach one
  fold operator in position order, and each key keeps the position of the last record of its input
  partition folded into it (``@{input}:{partition}``, :mod:`features.store`), so the store skips
  anything a replay brings again, and a key applied in part is refolded from its own position. Each
  (partition, entity field, bucket) is also one position source
  ``flink:{input}:{partition}:{field}:{bucket}`` in the view versions' positions hashes, read on start
  so a replay skips what was done without asking the keys. Positions are offsets or line numbers, so
  they are the same on every replay: after a restore from a checkpoint, a restart without one, or a
  resubmission.
- At-least-once: the Redis calls themselves (a replayed batch is sent again and skipped per key) and
  the dead letters.
- The fold buffer lives in keyed state, so a checkpoint holds what was read but not yet written.
- ``--buckets`` must never change for a namespace: position sources are named after the bucket.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pyflink.common import Duration, Row, Types, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import (
    KeyedProcessFunction,
    OutputTag,
    ProcessFunction,
    RuntimeContext,
    StreamExecutionEnvironment,
)
from pyflink.datastream.connectors.base import Sink
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor
from pyflink.java_gateway import get_gateway

from features import tiles
from features.admission import Admission
from features.store import Conflict, RedisWriter, ViewBatch, apply_until_settled
from infra.letters import DeadLetter
from schemas import codec
from schemas.definitions import FeatureView, Project, Source

log = logging.getLogger(__name__)

JOB_NAME = "tide-features"
END_OF_INPUT = (1 << 63) - 2  # an event-time timer here fires only on the final watermark (bounded input)
DEAD_LETTERS = OutputTag("dead-letters", Types.PICKLED_BYTE_ARRAY())
STAT_FIELDS = ("records", "events", "applied", "refused")


@dataclass(frozen=True)
class JobConfig:
    """Everything the job needs, built once in :func:`main` and shipped to the operators."""

    redis_url: str
    definitions: str  # the project's definitions, as JSON (Project.to_dict())
    source: str  # the name of the source whose views the job keeps
    namespace: str = ""
    input_name: str = "input"  # names the position sources; the Kafka topic, or the input file's stem
    buckets: int = 64
    batch: int = 1000  # records per bucket before a flush
    flush_ms: int = 200  # the longest a record waits in a bucket's buffer
    parallelism: int | None = None
    checkpoint_ms: int = 10_000
    kafka: str | None = None
    topic: str | None = None
    group: str = "tide-flink-features"
    dead_letter_topic: str = "dead-letter"

    def __post_init__(self) -> None:
        project = self.project
        if self.source not in project.sources:
            raise ValueError(
                f"--source {self.source!r}: not a source of the project ({sorted(project.sources)})"
            )
        if not self.views:
            raise ValueError(f"--source {self.source!r}: no feature view reads it")
        for key in ("buckets", "batch", "flush_ms"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be positive")
        if ":" in self.input_name:
            raise ValueError(f"--input-name {self.input_name!r} must not contain ':'")

    @property
    def project(self) -> Project:
        """The definitions (parsed again where asked: the config travels to the workers as JSON)."""
        return Project.from_dict(json.loads(self.definitions))

    @property
    def views(self) -> list[FeatureView]:
        return [v for v in self.project.views.values() if v.source_name == self.source]

    @property
    def record(self) -> str:
        """The codec's name of the source's records (the source's name)."""
        return self.source

    def register_schemas(self) -> Source:
        """Makes the source's schema versions known to this process's codec; returns the source."""
        source = self.project.sources[self.source]
        codec.register(source.name, list(source.versions))
        return source


def bucket_of(entity: str, buckets: int) -> int:
    """A stable bucket (crc32, the same in every process, unlike ``hash``)."""
    return zlib.crc32(entity.encode()) % buckets


def position_source(input_name: str, partition: int, group: str) -> str:
    """The name of one ordered position source in the views' positions hashes (``group``: the entity
    field and bucket, ``field:bucket``)."""
    return f"flink:{input_name}:{partition}:{group}"


def entity_groups(views: Sequence[FeatureView]) -> dict[str, list[FeatureView]]:
    """Views by entity field: an event is routed once per entity it aggregates into."""
    out: dict[str, list[FeatureView]] = defaultdict(list)
    for view in views:
        out[view.entity_key].append(view)
    return dict(out)


def dead_letter(
    stage: str,
    error: str,
    error_type: str,
    key: bytes | None,
    value: bytes | None,
    where: tuple[str, int, int],
) -> dict[str, Any]:
    topic, partition, offset = where
    letter = DeadLetter(stage, error, error_type, key, value, topic, partition, offset)
    headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in letter.headers()}
    return {"key": key, "value": value, "headers": headers}


# --- operators ---------------------------------------------------------------------------------------------


class Admit(KeyedProcessFunction):
    """Keyed by source partition, in its order: decodes, then applies the shared lateness rule per view.

    Input: ``(partition, position[, key], payload)``; a file line is JSON, Avro-encoded and decoded again
    here so it is validated and normalised exactly as an event from Kafka. Output: one record per entity
    group, ``(group key, partition, position, event, on-time view names, watermark)``. Undecodable events
    and late ones (once per view they are late for) go to the dead letters. The partition's watermark
    (the newest event time seen in it, the same for every view) is keyed state, so a restore decides
    exactly as the first pass did.
    """

    def __init__(self, config: JobConfig) -> None:
        self.config = config

    def open(self, runtime_context: RuntimeContext) -> None:
        self.config.register_schemas()
        self.views = self.config.views
        self.groups = entity_groups(self.views)
        self.admission = Admission.of_source(self.views)
        self.watermark = runtime_context.get_state(ValueStateDescriptor("watermark", Types.LONG()))

    def process_element(self, value: Any, ctx: KeyedProcessFunction.Context) -> Iterator[Any]:
        if len(value) == 4:
            partition, position, key, payload = value[0], value[1], value[2], value[3]
        else:
            partition, position, key, payload = value[0], value[1], None, value[2]
        where = (self.config.input_name, partition, position)
        try:
            if isinstance(payload, str):
                payload = codec.encode(self.config.record, json.loads(payload))
            event = codec.decode(payload, self.config.record)
        except Exception as exc:
            raw = payload.encode() if isinstance(payload, str) else payload
            yield DEAD_LETTERS, dead_letter("flink.decode", str(exc), type(exc).__name__, key, raw, where)
            return
        rejection = self.admission.check(event, int(time.time() * 1000))
        if rejection is not None:  # poison: never folded, never moves the watermark
            letter = dead_letter("flink.admit", rejection.reason, rejection.error_type, key, payload, where)
            yield DEAD_LETTERS, letter
            return
        before = self.watermark.value()
        before = tiles.NO_WATERMARK if before is None else before
        on_time: set[str] = set()
        watermark = before
        for view in self.views:
            kept, late, watermark = tiles.split_late(view, [(position, event)], before)
            if kept:
                on_time.add(view.name)
            for _, _, by_ms in late:
                reason = f"late by {by_ms} ms beyond the allowed lateness of {view.allowed_lateness_ms} ms"
                stage = f"flink.features.{view.name}"
                yield DEAD_LETTERS, dead_letter(stage, reason, "LateEvent", key, payload, where)
        self.watermark.update(watermark)
        for field, views in self.groups.items():
            names = tuple(v.name for v in views if v.name in on_time)
            if names:
                group = f"{field}:{bucket_of(str(event[field]), self.config.buckets)}"
                yield group, partition, position, event, names, watermark
            # else: late for every view of this entity; the next batch's position covers it


class EventTime(TimestampAssigner):
    def __init__(self, field: str) -> None:
        self.field = field

    def extract_timestamp(self, value: Any, record_timestamp: int) -> int:
        return int(value[3][self.field])


class Fold(KeyedProcessFunction):
    """Keyed by (entity field, bucket): buffers records in keyed state and folds them into Redis.

    A flush applies every partition's records after its position source's stored position (all the
    group's views at once) in one round trip (:meth:`features.store.RedisWriter.apply`), moving the
    position sources to the batch's last position; a key another attempt applied in part is refolded
    from its own position and applied again. Emits a stats tuple per flush.
    """

    def __init__(self, config: JobConfig) -> None:
        self.config = config

    def open(self, runtime_context: RuntimeContext) -> None:
        views = self.config.views
        self.views = {v.name: v for v in views}
        self.groups = entity_groups(views)
        self.client = redis.Redis.from_url(self.config.redis_url)
        self.writer = RedisWriter(self.client, self.config.namespace)
        self.positions: dict[str, int] = {}  # position source -> applied position
        self.buffer = runtime_context.get_list_state(
            ListStateDescriptor("buffer", Types.PICKLED_BYTE_ARRAY())
        )
        self.count = runtime_context.get_state(ValueStateDescriptor("count", Types.INT()))
        self.armed = runtime_context.get_state(ValueStateDescriptor("armed", Types.BOOLEAN()))

    def close(self) -> None:
        self.client.close()

    def process_element(self, value: Any, ctx: KeyedProcessFunction.Context) -> Iterator[Any]:
        self.buffer.add(value[1:])
        n = (self.count.value() or 0) + 1
        if n >= self.config.batch:
            yield from self._flush(ctx.get_current_key())
            return
        self.count.update(n)
        if not self.armed.value():
            timers = ctx.timer_service()
            timers.register_processing_time_timer(timers.current_processing_time() + self.config.flush_ms)
            timers.register_event_time_timer(END_OF_INPUT)
            self.armed.update(True)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterator[Any]:
        yield from self._flush(ctx.get_current_key())

    def _flush(self, key: str) -> Iterator[Any]:
        records = list(self.buffer.get() or ())
        self.buffer.clear()
        self.count.clear()
        self.armed.clear()
        if records:
            stats = self.write(key, records)
            yield (key, *(stats[f] for f in STAT_FIELDS))

    def write(self, group: str, records: Sequence[tuple[Any, ...]]) -> dict[str, int]:
        """Fold ``(partition, position, event, on-time views, watermark)`` records of one group (entity
        field and bucket), in order."""
        views = self.groups[group.rpartition(":")[0]]
        by_partition: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
        for record in records:
            by_partition[record[0]].append(record)
        todo = [
            (position_source(self.config.input_name, partition, group), partition, recs)
            for partition, recs in by_partition.items()
        ]
        self._load_positions(views, [source for source, _, _ in todo])
        stats = dict.fromkeys(STAT_FIELDS, 0)
        stats["records"] = len(records)
        writes: list[ViewBatch] = []
        fresh_of: list[list[tuple[Any, ...]]] = []
        for source, partition, recs in todo:
            fresh = [r for r in recs if r[1] > self.positions[source]]
            if not fresh:
                continue
            new_position, watermark = fresh[-1][1], fresh[-1][4]
            for view in views:
                deltas = tiles.record_deltas(view, [(r[1], r[2]) for r in fresh if view.name in r[3]])
                key_source = f"{self.config.input_name}:{partition}"
                writes.append(ViewBatch(view, key_source, deltas, new_position, watermark, source))
                fresh_of.append(fresh)
            self.positions[source] = new_position
            stats["applied"] += 1
            stats["events"] += sum(len(r[3]) for r in fresh)

        def attempt(todo: list[tuple[ViewBatch, list[tuple[Any, ...]], list[Conflict]]]) -> list[Any]:
            redo = [(w, fresh, _refold(w, fresh, cs)) for w, fresh, cs in todo]
            left = self.writer.apply([w for _, _, w in redo])
            stats["refused"] += len(left)
            by_write: dict[int, list[Conflict]] = defaultdict(list)
            for c in left:
                by_write[c.batch].append(c)
            return [(redo[i][2], redo[i][1], cs) for i, cs in by_write.items()]

        conflicts = self.writer.apply(writes)
        if conflicts:  # another attempt applied part of these keys: each is redone from its own position
            stats["refused"] += len(conflicts)
            first: dict[int, list[Conflict]] = defaultdict(list)
            for c in conflicts:
                first[c.batch].append(c)
            again = [(writes[i], fresh_of[i], cs) for i, cs in first.items()]
            apply_until_settled(again, attempt, f"group {group}")
        return stats

    def _load_positions(self, views: Sequence[FeatureView], sources: Sequence[str]) -> None:
        """The applied position of each position source: the lowest of the views' (they move together)."""
        missing = [source for source in sources if source not in self.positions]
        if not missing:
            return
        found = self.writer.positions_of([(view, source) for source in missing for view in views])
        for i, source in enumerate(missing):
            self.positions[source] = min(p for p, _ in found[i * len(views) : (i + 1) * len(views)])


def _refold(write: ViewBatch, fresh: Sequence[tuple[Any, ...]], conflicts: Sequence[Conflict]) -> ViewBatch:
    """``write`` again with only its conflicted keys, each from its records after the key's position (the
    lateness decisions travel with the records)."""
    view = write.view
    deltas = {}
    for c in conflicts:
        todo = [
            (r[1], r[2])
            for r in fresh
            if r[1] > c.applied and view.name in r[3] and str(r[2][view.entity_key]) == c.entity
        ]
        if todo:
            deltas[c.entity] = tiles.record_deltas(view, todo)[c.entity]
    return ViewBatch(view, write.source, deltas, write.position, write.watermark, write.position_field)


class LogDeadLetter(ProcessFunction):
    """Local runs: dead letters are logged (a Kafka run writes them to the dead-letter topic)."""

    def process_element(self, value: Any, ctx: ProcessFunction.Context) -> Iterator[Any]:
        h = value["headers"]
        log.warning(
            "dead letter stage=%s input=%s partition=%s position=%s: %s",
            h["tide.stage"], h["tide.source.topic"], h["tide.source.partition"],
            h["tide.source.offset"], h["tide.error"],
        )  # fmt: skip
        yield h["tide.stage"]


# --- the job -----------------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[tuple[int, int, str]]:
    """A JSONL file as ``(partition 0, line index, line)``; blank lines are skipped, keeping indices."""
    with path.open(encoding="utf-8") as f:
        return [(0, i, line) for i, line in enumerate(f) if line.strip()]


def _kafka_source(env: StreamExecutionEnvironment, config: JobConfig) -> Any:
    from pyflink.table import StreamTableEnvironment

    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(f"""
        CREATE TABLE tide_source (
          `k` BYTES,
          `v` BYTES,
          `partition` INT METADATA VIRTUAL,
          `offset` BIGINT METADATA VIRTUAL
        ) WITH (
          'connector' = 'kafka',
          'topic' = '{config.topic}',
          'properties.bootstrap.servers' = '{config.kafka}',
          'properties.group.id' = '{config.group}',
          'properties.auto.offset.reset' = 'earliest',
          'scan.startup.mode' = 'group-offsets',
          'key.format' = 'raw',
          'key.fields' = 'k',
          'value.format' = 'raw',
          'value.fields-include' = 'EXCEPT_KEY'
        )""")
    rows = t_env.to_data_stream(t_env.sql_query("SELECT `partition`, `offset`, `k`, `v` FROM tide_source"))
    return t_env, rows.map(lambda r: (r[0], r[1], r[2], r[3]), Types.PICKLED_BYTE_ARRAY()).name("source")


def _kafka_dead_letters(t_env: Any, dead: Any, config: JobConfig) -> None:
    t_env.execute_sql(f"""
        CREATE TABLE tide_dead_letters (
          `k` BYTES,
          `v` BYTES,
          `headers` MAP<STRING, BYTES> METADATA
        ) WITH (
          'connector' = 'kafka',
          'topic' = '{config.dead_letter_topic}',
          'properties.bootstrap.servers' = '{config.kafka}',
          'sink.delivery-guarantee' = 'at-least-once',
          'key.format' = 'raw',
          'key.fields' = 'k',
          'value.format' = 'raw',
          'value.fields-include' = 'EXCEPT_KEY'
        )""")
    raw = Types.PRIMITIVE_ARRAY(Types.BYTE())
    row_type = Types.ROW_NAMED(["k", "v", "headers"], [raw, raw, Types.MAP(Types.STRING(), raw)])
    rows = dead.map(
        lambda d: Row(d["key"], d["value"], {k: v.encode() for k, v in d["headers"].items()}), row_type
    ).name("dead-letter rows")
    statements = t_env.create_statement_set()
    statements.add_insert("tide_dead_letters", t_env.from_data_stream(rows))
    statements.attach_as_datastream()


def build(env: StreamExecutionEnvironment, config: JobConfig, lines: Sequence[tuple[Any, ...]] | None) -> Any:
    """Adds the pipeline to ``env``; returns the stats stream (one tuple per flush)."""
    views = config.views
    if lines is not None:
        t_env = None
        line_type = Types.TUPLE([Types.INT(), Types.LONG(), Types.STRING()])
        raw = env.from_collection(list(lines), line_type).name("source")
    else:
        t_env, raw = _kafka_source(env, config)
    # Keyed by partition straight from the source: one channel per partition keeps its order.
    admitted = (
        raw.key_by(lambda r: r[0], Types.INT())
        .process(Admit(config), Types.PICKLED_BYTE_ARRAY())
        .name("admit")
    )
    lateness = max(v.allowed_lateness_ms for v in views)
    strategy = (
        WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(lateness))
        .with_timestamp_assigner(EventTime(views[0].event_time))
        .with_idleness(Duration.of_seconds(30))
    )
    routed = admitted.assign_timestamps_and_watermarks(strategy).name("event-time")
    dead = admitted.get_side_output(DEAD_LETTERS)
    if t_env is not None:
        _kafka_dead_letters(t_env, dead, config)
    else:
        dead.process(LogDeadLetter(), Types.STRING()).name("dead letters").sink_to(_discard())
    stat_type = Types.TUPLE([Types.STRING(), *(Types.LONG() for _ in STAT_FIELDS)])
    return routed.key_by(lambda r: r[0], Types.STRING()).process(Fold(config), stat_type).name("fold")


def _discard() -> Sink:
    return Sink(get_gateway().jvm.org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink())


def environment(config: JobConfig) -> StreamExecutionEnvironment:
    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_python_executable(sys.executable)  # Python workers run this interpreter, not PATH's python
    if config.parallelism:
        env.set_parallelism(config.parallelism)
    if config.kafka:
        env.enable_checkpointing(config.checkpoint_ms)  # exactly-once barriers (the default mode)
    return env


def run_local(config: JobConfig, lines: Sequence[tuple[Any, ...]]) -> dict[str, int]:
    """Runs the job on a local mini-cluster over ``lines`` and returns the summed flush stats."""
    env = environment(config)
    totals = dict.fromkeys(("flushes", *STAT_FIELDS), 0)
    with build(env, config, lines).execute_and_collect(JOB_NAME) as results:
        for row in results:
            totals["flushes"] += 1
            for i, f in enumerate(STAT_FIELDS, start=1):
                totals[f] += int(row[i])
    return totals


def run_kafka(config: JobConfig) -> None:
    env = environment(config)
    build(env, config, None).sink_to(_discard()).name("stats")
    env.execute(JOB_NAME)


def parse_args(argv: Sequence[str] | None = None) -> tuple[JobConfig, Path | None]:
    p = argparse.ArgumentParser(prog="python -m features.flink.job", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--input", type=Path, help="JSONL events: run on a local mini-cluster")
    where.add_argument("--kafka", help="bootstrap servers, host:port (the compose image only)")
    p.add_argument("--definitions", type=Path, required=True, help="the project's definitions (JSON)")
    p.add_argument("--source", help="the source whose views to keep (default: the only one with views)")
    p.add_argument("--topic", help="the Kafka topic (default: the namespace + the source's topic)")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--namespace", default="", help="key prefix of the deployment (its topic prefix)")
    p.add_argument("--input-name", help="names the position sources (default: the topic or file stem)")
    p.add_argument("--buckets", type=int, default=JobConfig.buckets)
    p.add_argument("--batch", type=int, default=JobConfig.batch)
    p.add_argument("--flush-ms", type=int, default=JobConfig.flush_ms)
    p.add_argument("--parallelism", type=int)
    p.add_argument("--checkpoint-ms", type=int, default=JobConfig.checkpoint_ms)
    p.add_argument("--group", default=JobConfig.group)
    p.add_argument("--dead-letter-topic", help="default: the namespace + dead-letter")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        document = json.loads(a.definitions.read_text(encoding="utf-8"))
        if "body" in document:  # a registry record: its body is the definitions
            body = document["body"]  # a string in the record, an object in `tide registry` output
            document = body if isinstance(body, dict) else json.loads(body)
        project = Project.from_dict(document)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        p.error(f"--definitions {a.definitions}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # DefinitionError names the object and field
        p.error(f"--definitions {a.definitions}: {exc}")
    source = a.source or _only_source(p, project)
    if source not in project.sources:
        p.error(f"--source {source!r}: not a source of the project ({sorted(project.sources)})")
    topic = a.topic or a.namespace + project.sources[source].topic_name
    name = a.input_name or (a.input.stem if a.input is not None else topic)
    try:
        config = JobConfig(
            redis_url=a.redis_url, definitions=json.dumps(project.to_dict()), source=source,
            namespace=a.namespace, input_name=name, buckets=a.buckets, batch=a.batch, flush_ms=a.flush_ms,
            parallelism=a.parallelism, checkpoint_ms=a.checkpoint_ms, kafka=a.kafka,
            topic=topic if a.kafka else None, group=a.group,
            dead_letter_topic=a.dead_letter_topic or a.namespace + "dead-letter",
        )  # fmt: skip
    except ValueError as exc:
        p.error(str(exc))
    return config, a.input


def _only_source(p: argparse.ArgumentParser, project: Project) -> str:
    with_views = sorted({v.source_name for v in project.views.values()})
    if len(with_views) != 1:
        p.error(f"pass --source (sources with views: {', '.join(with_views) or 'none'})")
    return with_views[0]


def main(argv: Sequence[str] | None = None) -> None:
    config, path = parse_args(argv)
    if path is None:
        log.info("%s: Kafka %s topic %s -> %s", JOB_NAME, config.kafka, config.topic, config.redis_url)
        run_kafka(config)
        return
    started = time.perf_counter()
    config.register_schemas()  # file lines are encoded and decoded in the admit operator
    lines = read_lines(path)
    totals = run_local(config, lines)
    # stdout, not the log: in local runs Beam's worker takes over the root logger's handlers
    summary = {"input": str(path), "lines": len(lines), "seconds": round(time.perf_counter() - started, 2)}
    sys.stdout.write(json.dumps({**summary, **totals}) + "\n")


if __name__ == "__main__":
    main()
