"""Multiprocess Prometheus metrics: values from several worker processes add up in one /metrics payload."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import Counter

from infra.metrics import metric_value
from serving.metrics import MULTIPROC_ENV, metrics_payload, multiprocess_dir, multiprocess_mode

# What a worker does: import prometheus_client fresh (as a spawned uvicorn worker does), count, set a gauge.
WORKER = textwrap.dedent(
    """
    import sys
    from prometheus_client import Counter, Gauge, Histogram
    from serving.metrics import multiprocess_mode
    assert multiprocess_mode(), "PROMETHEUS_MULTIPROC_DIR was not seen at import"
    n, version = int(sys.argv[1]), int(sys.argv[2])
    requests = Counter("tide_test_requests_total", "test", ["route"])
    requests.labels("score").inc(n)
    Gauge("tide_test_version", "test", ["model"], multiprocess_mode="max").labels("fraud").set(version)
    Histogram("tide_test_latency_seconds", "test", buckets=(0.1, 1.0)).observe(0.05)
    """
)


def run_worker(directory: Path, n: int, version: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(n), str(version)], env=env)


def test_two_processes_sum_in_one_payload():
    with multiprocess_dir() as directory:
        assert os.environ[MULTIPROC_ENV] == str(directory) and not any(directory.iterdir())
        workers = [run_worker(directory, 3, 7), run_worker(directory, 4, 9)]
        assert [w.wait(60) for w in workers] == [0, 0]
        body, content_type = metrics_payload()
        text = body.decode()
        assert content_type.startswith("text/plain")
        assert metric_value(text, "tide_test_requests_total", 'route="score"') == 7.0
        assert metric_value(text, "tide_test_version", 'model="fraud"') == 9.0  # "max" across workers
        assert metric_value(text, "tide_test_latency_seconds_count") == 2.0
        # The same when the directory is named rather than taken from the environment.
        assert metrics_payload(directory)[0] == body
    assert MULTIPROC_ENV not in os.environ
    assert not directory.exists()


def test_each_run_starts_from_an_empty_directory():
    with multiprocess_dir() as first:
        assert run_worker(first, 5, 1).wait(60) == 0
        assert metric_value(metrics_payload()[0].decode(), "tide_test_requests_total", 'route="score"') == 5
    with multiprocess_dir() as second:
        assert second != first and not any(second.iterdir())
        assert (
            metric_value(metrics_payload()[0].decode(), "tide_test_requests_total", 'route="score"') is None
        )


def test_previous_value_of_the_variable_is_restored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with multiprocess_dir(parent=tmp_path) as directory:
        assert directory.parent == tmp_path
    assert os.environ[MULTIPROC_ENV] == str(tmp_path)


def test_single_process_uses_the_default_registry(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    assert not multiprocess_mode()  # this test process imported prometheus_client without the variable
    counter = Counter("tide_test_single_total", "test")
    counter.inc(2)
    assert metric_value(metrics_payload()[0].decode(), "tide_test_single_total") == 2.0
