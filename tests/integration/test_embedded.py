"""The embedded stack against the real servers: start, round trips, topic admin, and stopping by PID."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from infra.admin import create_topics, delete_topics
from infra.errors import StackError, StreamError
from tide.embedded import (
    EmbeddedStack,
    StackInfo,
    broker_command,
    free_port,
    read_state,
    redis_command,
    stack_status,
    stop_stack,
)

pytestmark = pytest.mark.integration


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer exists (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _partition_counts(bootstrap: str, names: list[str]) -> dict[str, int | None]:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {n: len(md.topics[n].partitions) if n in md.topics else None for n in names}


def test_stack_is_up_and_recorded(stack: StackInfo) -> None:
    state = read_state(stack.state_dir)
    assert state is not None
    assert state["kafka_bootstrap"] == stack.kafka_bootstrap
    assert state["redis_url"] == stack.redis_url
    assert state["broker"]["pid"] == stack.broker_pid and state["redis"]["pid"] == stack.redis_pid
    assert stack.kafka_bootstrap.startswith("127.0.0.1:") and stack.redis_url.startswith("redis://127.0.0.1:")
    assert (stack.state_dir / "logs" / "broker.log").is_file()
    assert (stack.state_dir / "logs" / "redis.log").is_file()

    status = stack_status(stack.state_dir)
    assert status["running"] is True
    for name, pid in (("broker", stack.broker_pid), ("redis", stack.redis_pid)):
        assert status[name]["pid"] == pid
        assert status[name]["alive"] is True and status[name]["answering"] is True


def test_second_start_in_same_state_dir_is_refused(stack: StackInfo) -> None:
    with pytest.raises(StackError, match="already running"):
        EmbeddedStack(stack.state_dir).start()
    assert read_state(stack.state_dir) is not None  # the running stack's state is untouched


def test_produce_consume_round_trip(stack: StackInfo, topic_prefix: str) -> None:
    topic = topic_prefix + "roundtrip"
    create_topics(stack.kafka_bootstrap, {topic: 2})
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=b"k1", value=b"hello", headers=[("h", b"v")])
    assert producer.flush(10) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": stack.kafka_bootstrap,
            "group.id": topic_prefix + "group",
            "session.timeout.ms": 6000,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        msg = None
        deadline = time.monotonic() + 30
        while msg is None and time.monotonic() < deadline:
            polled = consumer.poll(0.5)
            if polled is not None:
                assert polled.error() is None, polled.error()
                msg = polled
        assert msg is not None, "no record consumed within 30 s"
        assert (msg.key(), msg.value(), msg.headers()) == (b"k1", b"hello", [("h", b"v")])
        consumer.commit(message=msg, asynchronous=False)
    finally:
        consumer.close()


def test_redis_set_get(stack: StackInfo, topic_prefix: str) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        client.set(topic_prefix + "key", b"value")
        assert client.get(topic_prefix + "key") == b"value"
    finally:
        client.close()


def test_create_topics_partition_counts_and_idempotence(stack: StackInfo, topic_prefix: str) -> None:
    wanted = {topic_prefix + "one": 1, topic_prefix + "three": 3, topic_prefix + "eight": 8}
    create_topics(stack.kafka_bootstrap, wanted)
    assert _partition_counts(stack.kafka_bootstrap, list(wanted)) == wanted
    create_topics(stack.kafka_bootstrap, wanted)  # already there: success
    assert _partition_counts(stack.kafka_bootstrap, list(wanted)) == wanted

    with pytest.raises(StreamError, match="partitions"):
        create_topics(stack.kafka_bootstrap, {topic_prefix + "three": 5}, timeout=5)
    with pytest.raises(StreamError):
        create_topics(stack.kafka_bootstrap, {topic_prefix + "zero": 0})

    delete_topics(stack.kafka_bootstrap, wanted)
    assert set(_partition_counts(stack.kafka_bootstrap, list(wanted)).values()) == {None}
    delete_topics(stack.kafka_bootstrap, wanted)  # already gone: success


def test_stop_leaves_no_process_and_is_idempotent(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path)
    info = stack.start()
    # A connected client makes tansu linger ~5 s after SIGTERM; stop must still be quick.
    admin = AdminClient({"bootstrap.servers": info.kafka_bootstrap})
    admin.list_topics(timeout=5)
    started = time.monotonic()
    stack.stop()
    assert time.monotonic() - started < 4
    assert _gone(info.broker_pid) and _gone(info.redis_pid)
    assert read_state(tmp_path) is None
    assert not (tmp_path / "dump.rdb").exists()  # Redis runs without persistence
    stack.stop()
    assert stop_stack(tmp_path) is False
    assert stack_status(tmp_path)["running"] is False


def test_stop_stack_from_state_file(tmp_path: Path) -> None:
    info = EmbeddedStack(tmp_path).start()
    assert stop_stack(tmp_path) is True
    assert _gone(info.broker_pid) and _gone(info.redis_pid)
    assert read_state(tmp_path) is None
    assert stop_stack(tmp_path) is False


def test_stop_stack_with_nothing_running(tmp_path: Path) -> None:
    assert stop_stack(tmp_path) is False
    assert stack_status(tmp_path) == {
        "state_dir": str(tmp_path),
        "running": False,
        "started_at": None,
        "broker": None,
        "redis": None,
    }


def test_stale_pids_are_never_signalled(tmp_path: Path) -> None:
    """A state file whose PIDs now belong to other live processes: those processes are left alone."""
    bystander_cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    bystander = subprocess.Popen(bystander_cmd)
    try:
        state = {
            "kafka_bootstrap": "127.0.0.1:1",
            "redis_url": "redis://127.0.0.1:1/0",
            "broker": {"pid": os.getpid(), "port": 1, "cmd": broker_command(1)},
            "redis": {"pid": bystander.pid, "port": 1, "cmd": redis_command(1, tmp_path)},
            "started_at": "2000-01-01T00:00:00+00:00",
        }
        (tmp_path / "stack.json").write_text(json.dumps(state))
        status = stack_status(tmp_path)
        assert status["broker"]["alive"] is False and status["redis"]["alive"] is False
        assert stop_stack(tmp_path) is False
        assert bystander.poll() is None  # still running; and so, evidently, is this test process
        assert read_state(tmp_path) is None

        # Same PID and command line but another start time: a reused PID, also left alone.
        reused = {"pid": bystander.pid, "port": 1, "cmd": bystander_cmd, "start_ticks": 1}
        (tmp_path / "stack.json").write_text(json.dumps({**state, "broker": reused, "redis": reused}))
        assert stop_stack(tmp_path) is False
        assert bystander.poll() is None

        # A stale state file does not block a new start either.
        (tmp_path / "stack.json").write_text(json.dumps(state))
        with EmbeddedStack(tmp_path) as info:
            assert read_state(tmp_path)["broker"]["pid"] == info.broker_pid  # type: ignore[index]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_failed_start_reports_log_and_cleans_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        kafka_port = taken.getsockname()[1]
        redis_port = free_port()
        stack = EmbeddedStack(
            tmp_path / f"s{uuid.uuid4().hex[:6]}", kafka_port=kafka_port, redis_port=redis_port
        )
        with pytest.raises(StackError, match="broker") as excinfo:
            stack.start(timeout=5)
    assert "broker.log" in str(excinfo.value)
    assert not _listening(redis_port)  # redis, started alongside, was stopped again
    assert read_state(stack.state_dir) is None
