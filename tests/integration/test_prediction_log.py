"""The prediction log through a broker outage: logging never blocks, and the backlog is delivered, once
each, when a broker comes up."""

from __future__ import annotations

import subprocess
import time

import pytest

from infra.kafka import read_to_end
from infra.topics import TOPICS, ensure_topics, topic
from schemas import codec
from serving.predlog import PredictionLog
from serving.settings import ServeSettings
from tide.embedded import broker_answers, broker_command, free_port
from tide.processes import wait_until

pytestmark = pytest.mark.integration

RECORDS = 2_000


def prediction(i: int) -> dict:
    return {
        "request_id": f"r{i}",
        "event_id": None,
        "entities": {"user_id": f"u{i % 37}"},
        "model": "m",
        "version": 1,
        "arm": "champion",
        "features": {"x": float(i), "n": i},
        "score": 0.5,
        "label": None,
        "probabilities": None,
        "latency_ms": 1.0,
        "ts": 1,
    }


def test_backlog_is_delivered_when_the_broker_returns() -> None:
    port = free_port()
    settings = ServeSettings(kafka_bootstrap=f"127.0.0.1:{port}", topic_prefix="outage.")
    log = PredictionLog(settings)
    log.start()
    broker: subprocess.Popen[bytes] | None = None
    try:
        started = time.perf_counter()
        for i in range(RECORDS):  # nothing listens on the port: scoring must not notice
            log.log(prediction(i))
        assert time.perf_counter() - started < 1.0
        time.sleep(2.0)  # the broker stays away a while; the records wait in the bounded queue

        broker = subprocess.Popen(broker_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: broker_answers(settings.kafka_bootstrap), 20)
        ensure_topics(settings)
        assert log.close(timeout=30) == 0  # flushed: every record acknowledged
        name = topic(settings, "predictions")
        got = [
            codec.decode(m.value(), "prediction")["request_id"]
            for m in read_to_end(settings, name, TOPICS["predictions"].partitions)
        ]
        assert sorted(got) == sorted(f"r{i}" for i in range(RECORDS))  # all of them, none twice
    finally:
        log.close(timeout=1)
        if broker is not None:
            broker.terminate()
            broker.wait(10)
