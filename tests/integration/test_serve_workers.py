"""`tide serve` with several workers, as a real process on a real port: every worker follows the models
topic and the registry and scores, and /metrics sums all workers whichever one answers the scrape."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from river import compose, linear_model

from infra.imports import import_object
from infra.settings import CommonSettings, env_var
from models.artifacts import dump_river
from online_training.publish import publish_model_version
from schemas import registry
from schemas.definitions import Project
from tide.embedded import free_port
from tide.processes import wait_until

pytestmark = pytest.mark.integration

REQUESTS = 60
FEATURES = {"amount": 42.0, "category": "travel", "country": "DE", "card_present": True}


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _score(url: str, body: dict) -> httpx.Response:
    """POST like a client that honours 503 + Retry-After (a worker still loading its first model)."""
    for _ in range(40):
        resp = httpx.post(url, json=body, timeout=5)
        if resp.status_code != 503:
            return resp
        time.sleep(float(resp.headers.get("retry-after", "1")) / 2)
    return resp


def _scored(metrics: str) -> float:
    found = re.search(r'^tide_requests_total\{route="score",status="200"\} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


def test_two_workers_serve_and_metrics_add_up(
    fraud: CommonSettings, fraud_project: Project, tmp_path: Path
) -> None:
    settings = fraud
    model = fraud_project.models["fraud"]
    artifact, _ = dump_river(import_object(str(model.learner))())
    publish_model_version(
        settings, model="fraud", version=1, flavor="river", artifact=artifact, feature_names=model.input_names
    )
    port = free_port()
    env = {
        **os.environ,
        env_var("kafka_bootstrap"): settings.kafka_bootstrap,
        env_var("redis_url"): settings.redis_url,
        env_var("topic_prefix"): settings.topic_prefix,
        env_var("state_dir"): str(tmp_path),
        env_var("serve_port"): str(port),
        env_var("serve_workers"): "2",
        env_var("project"): str(settings.project),  # where the workers import the pipeline's code from
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "tide.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Each worker loads the model itself; a run of ready answers on fresh connections means both have.
        assert wait_until(lambda: all(_ready(url) for _ in range(10)), 90), "2 workers never both ready"
        with httpx.Client(base_url=url, timeout=5) as client:
            for i in range(REQUESTS):  # new connections: the kernel spreads them over the workers
                resp = httpx.post(
                    f"{url}/v1/models/fraud/score", json={"entity": f"c{i}", "features": FEATURES}
                )
                assert resp.status_code == 200, resp.text
                assert resp.json()["version"] == 1
            # Whichever worker answers the scrape, it reports every worker's requests.
            for _ in range(5):
                assert _scored(client.get("/metrics").text) == REQUESTS
        # A model applied while the workers run: each worker follows the registry and serves it.
        lite = dataclasses.replace(model, name="fraud_lite", request_fields=["amount"], monitor=())
        registry.publish(
            settings,
            dataclasses.replace(fraud_project, models={**fraud_project.models, "fraud_lite": lite}),
            2,
        )
        lite_artifact, _ = dump_river(compose.Select("amount") | linear_model.LogisticRegression())
        publish_model_version(
            settings,
            model="fraud_lite",
            version=1,
            flavor="river",
            artifact=lite_artifact,
            feature_names=lite.input_names,
        )
        lite_url = f"{url}/v1/models/fraud_lite/score"
        body = {"entity": "c1", "features": {"amount": 3.0}}
        # fresh connections land on either worker: a run of 200s means both serve it
        ok = wait_until(lambda: all(_score(lite_url, body).status_code == 200 for _ in range(10)), 30)
        assert ok, _score(lite_url, body).text
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr.decode()[-2000:]
    pids = set(re.findall(rb"Started server process \[(\d+)\]", stderr))
    assert len(pids) == 2, stderr.decode()[-2000:]  # two workers really ran
