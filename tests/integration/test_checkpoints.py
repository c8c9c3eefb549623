"""A processor's positions and state commit with its output (infra/processor.py, schemas/checkpoints.py),
on the real embedded broker: a step that produces nothing still moves on, a restarted step resumes its
state where its last checkpoint left it, and what a crashed run had not checkpointed is done once."""

from __future__ import annotations

import threading
import time
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from infra import processor
from infra.deadletter import KafkaDeadLetters
from infra.kafka import make_consumer, make_transactional_producer, read_to_end
from infra.settings import CommonSettings
from infra.topics import topic
from schemas import codec
from schemas.checkpoints import KafkaCheckpoints

pytestmark = pytest.mark.integration


class Summing:
    """Sums the ``n`` of every deployment record it reads (its state); every ``emit_every``-th record it
    produces the running sum to ``out`` (its output). With ``crash_after``, raises SystemExit-like
    KeyboardInterrupt from ``flush`` after that many records, leaving the open transaction behind."""

    name = "summing"

    def __init__(self, producer: Producer, out: str, emit_every: int = 0, crash_after: int = 0) -> None:
        self.total = 0
        self.seen = 0
        self._producer = producer
        self._out = out
        self._emit_every = emit_every
        self._crash_after = crash_after

    def handle(self, item: processor.Incoming) -> None:
        self.total += int(item.value["weight"])
        self.seen += 1
        if self._emit_every and self.seen % self._emit_every == 0:
            self._producer.produce(self._out, value=str(self.total).encode())

    def flush(self) -> bool:
        if self._crash_after and self.seen >= self._crash_after:
            raise KeyboardInterrupt("crash")  # not an Exception: the loop does not catch it
        return True

    def idle(self) -> bool:
        return False

    def snapshot(self) -> bytes:
        return orjson.dumps({"total": self.total, "seen": self.seen})

    def restore(self, state: bytes) -> None:
        data: dict[str, Any] = orjson.loads(state)
        self.total, self.seen = data["total"], data["seen"]


def produce_inputs(settings: CommonSettings, start: int, count: int) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for i in range(start, start + count):
        record = {"model": "m", "action": "follow", "weight": float(i), "ts": i}
        producer.produce(topic(settings, "deployments"), codec.encode("deployment", record))
    producer.flush(10)


def run_step(
    settings: CommonSettings, step_of: Any, until: Any, *, timeout_s: float = 30.0
) -> tuple[Summing, BaseException | None]:
    """Run a Summing step (built by ``step_of(producer)``) in a thread until ``until(step)`` or a crash."""
    stop = threading.Event()
    producer = make_transactional_producer(settings, f"{settings.topic_prefix}summing")
    step = step_of(producer)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            processor.run(
                step,
                make_consumer(settings, f"{settings.topic_prefix}summing"),
                producer,
                KafkaDeadLetters(producer, topic(settings, "dead-letter")),
                {topic(settings, "deployments"): "deployment"},
                stop,
                codec.decode_named,
                batch=10,
                checkpoints=KafkaCheckpoints(settings, f"{settings.topic_prefix}summing"),
            )
        except BaseException as exc:  # the simulated crash
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and not until(step) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(30)
    return step, failure[0] if failure else None


def test_a_step_that_produces_nothing_resumes_where_it_stopped(settings: CommonSettings) -> None:
    produce_inputs(settings, 1, 40)
    first, failure = run_step(settings, lambda p: Summing(p, ""), lambda s: s.seen >= 40)
    assert failure is None and (first.seen, first.total) == (40, sum(range(1, 41)))

    produce_inputs(settings, 41, 10)
    second, failure = run_step(settings, lambda p: Summing(p, ""), lambda s: s.seen >= 50)
    # Restored state, and only the 10 new records read: nothing re-read although no record was produced.
    assert failure is None and (second.seen, second.total) == (50, sum(range(1, 51)))


def test_a_crash_neither_loses_nor_repeats_output(settings: CommonSettings) -> None:
    out = topic(settings, "drift-alerts")  # any topic of the namespace will do for raw output
    produce_inputs(settings, 1, 60)
    _, failure = run_step(settings, lambda p: Summing(p, out, emit_every=5, crash_after=35), lambda s: False)
    assert isinstance(failure, KeyboardInterrupt)  # crashed with a transaction open

    second, failure = run_step(settings, lambda p: Summing(p, out, emit_every=5), lambda s: s.seen >= 60)
    assert failure is None and (second.seen, second.total) == (60, sum(range(1, 61)))
    emitted = [int(m.value()) for m in read_to_end(settings, out, 1)]
    assert emitted == [sum(range(1, n + 1)) for n in range(5, 61, 5)]
