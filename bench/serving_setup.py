"""What ``make bench-serving`` sets up before it measures: online features, model versions, servers.

- Features: generated events for E entities are produced to ``events`` in event-time order (spread over
  the last ``span`` minutes, so the sliding hour holds several tiles per entity) and the real feature
  processor (``tide features``) folds them into Redis. Completion and the values are read through the
  store's public read API (``RedisOnlineStore.read_many``), never its keys.
- Models: :class:`Publisher` publishes versions of model ``fraud`` to the models topic: ONNX through
  ``online_training.publish.publish_model_version`` when that exists, else the river model exactly as
  the trainer publishes it (``TrainerStep.publish``). The flavor used is recorded.
- Servers: ``tide serve``, the ceiling (:mod:`bench.serving_ceiling`) and ``feast serve``, each one
  worker, on free ports of 127.0.0.1, stopped by PID.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.serving")

FEAST_PYTHON = Path(".venv-feast/bin/python")
FEAST_CLI = Path(".venv-feast/bin/feast")
MODEL = "fraud"


# --- HTTP helpers (stdlib only: the harness must not depend on what it measures) ---------------------------


def http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def wait_http(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log_path: Path, timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{tail(log_path)}")
        try:
            if check():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready in {timeout:.0f} s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL: only the process this harness started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# --- online features ------------------------------------------------------------------------------------


def entity_id(i: int) -> str:
    return f"card-{i:06d}"  # what bench/serving_load.py's Lua bodies name


def fill_features(
    info: Any,
    settings: Any,
    env: dict[str, str],
    entities: int,
    per_entity: int,
    span_min: float,
    run_dir: Path,
) -> dict[str, Any]:
    """Produce ``entities * per_entity`` events and run ``tide features`` until all are in Redis."""
    from bench.features import generate
    from schemas.definitions import CARD_ACTIVITY
    from tide.processes import Services
    from streams.produce import EventProducer

    total = entities * per_entity
    now_ms = int(time.time() * 1000)
    first_ms = now_ms - int(span_min * 60_000)
    sender = EventProducer(settings, validate=False, **{"linger.ms": 20, "batch.num.messages": 10000})
    for i, event in enumerate(generate(total, entities, seed=23)):
        event["ts"] = first_ms + (now_ms - first_ms) * i // total  # event-time order: nothing is late
        sender.send_event(event)
    sender.flush()
    if sender.failed:
        raise RuntimeError(f"{sender.failed} of {total} events were not delivered")
    services = Services(env | {"TIDE_FEATURES_GROUP": "bench-serving-fill"}, run_dir / "logs")
    started = time.perf_counter()
    proc = services.start("features", "features")
    ids = [entity_id(i) for i in range(entities)]
    counted = 0
    try:
        deadline = time.monotonic() + 120 + total / 500
        while True:
            rows = read_rows(settings, [CARD_ACTIVITY], ids)[CARD_ACTIVITY.name]
            counted = int(sum(float(r.values.get("txn_count_1h") or 0) for r in rows))
            if counted >= total:
                break
            if proc.poll() is not None:
                raise RuntimeError(
                    f"tide features exited ({proc.returncode}):\n{services.log_tail('features')}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"tide features: {counted} of {total} events in Redis in time")
            time.sleep(1.0)
    finally:
        services.stop_all()
    return {
        "events": total,
        "entities": entities,
        "events_per_entity": per_entity,
        "event_time_span_min": span_min,
        "counted_in_redis": counted,
        "seconds": round(time.perf_counter() - started, 1),
    }


def read_rows(
    settings: Any, views: Sequence[Any], ids: Sequence[str], chunk: int = 2000
) -> dict[str, list[Any]]:
    """``RedisOnlineStore.read_many`` over many entities, in chunks."""
    from features.store import RedisOnlineStore

    async def read() -> dict[str, list[Any]]:
        store = RedisOnlineStore.from_url(settings.redis_url, settings.topic_prefix)
        out: dict[str, list[Any]] = {v.name: [] for v in views}
        try:
            for at in range(0, len(ids), chunk):
                got = await store.read_many(list(views), list(ids[at : at + chunk]))
                for name, rows in got.items():
                    out[name].extend(rows)
        finally:
            await store.close()
        return out

    return asyncio.run(read())


def feast_values(settings: Any, entities: int, path: Path) -> dict[str, Any]:
    """Tide's current ``card_activity`` values of every entity, as the Feast side will write them."""
    from schemas.definitions import CARD_ACTIVITY

    rows = read_rows(settings, [CARD_ACTIVITY], [entity_id(i) for i in range(entities)])[CARD_ACTIVITY.name]
    integer_kinds = {"count", "distinct"}
    features = [
        {"name": a.name, "dtype": "Int64" if a.kind in integer_kinds else "Float64"}
        for a in CARD_ACTIVITY.aggregations
    ]
    spec = {
        "view": CARD_ACTIVITY.name,
        "entity": CARD_ACTIVITY.entity,
        "ttl_ms": CARD_ACTIVITY.ttl_ms,
        "features": features,
        "rows": [
            {"entity": r.entity, "event_ms": r.newest_event_ms or int(time.time() * 1000), "values": r.values}
            for r in rows
        ],
    }
    path.write_text(json.dumps(spec))
    return {"status": {s: sum(1 for r in rows if r.status == s) for s in ("present", "missing", "expired")}}


# --- model versions -------------------------------------------------------------------------------------


class Publisher:
    """Publishes versions of model ``fraud`` (ONNX when the project can build one, else river)."""

    def __init__(self, settings: Any, prefer_onnx: bool = True) -> None:
        self.settings = settings
        self.version = 0
        self.published: list[tuple[int, float]] = []  # (version, wall time)
        self._onnx: tuple[Callable[..., Any], bytes, list[str]] | None = None
        self.flavor = "river"
        self.onnx_unavailable_reason: str | None = None
        if prefer_onnx:
            try:
                self._onnx = _build_onnx()
                self.flavor = "onnx"
            except ImportError as exc:
                self.onnx_unavailable_reason = f"{type(exc).__name__}: {exc}"
        if self._onnx is None:
            self._river_setup()
        else:
            from infra.kafka import make_producer

            # One producer for every version: a new one per version would put its connection set-up
            # into the measured swap delay.
            self._producer = make_producer(settings)

    def _river_setup(self) -> None:
        import redis

        from infra.settings import load
        from online_training.trainer import TrainerSettings, TrainerStep
        from infra.kafka import make_producer

        trainer_settings = load(TrainerSettings, **self.settings.model_dump())
        self._producer = make_producer(trainer_settings)
        self._redis = redis.Redis.from_url(self.settings.redis_url)
        # The trainer's own publish path: version record, artifact, reference profile.
        self._step = TrainerStep(trainer_settings, self._producer, self._redis)

    def publish(self) -> int:
        self.version += 1
        if self._onnx is not None:
            publish, artifact, names = self._onnx
            publish(
                self.settings,
                model=MODEL,
                version=self.version,
                flavor="onnx",
                artifact=artifact,
                feature_names=names,
                metric_name="bench",
                metric_value=0.5,
                producer=self._producer,
            )
            if self._producer.flush(10):
                raise RuntimeError("model version not delivered")
        else:
            self._step.version = self.version - 1
            self._step.publish(self._producer)
            if self._producer.flush(10):
                raise RuntimeError("model version not delivered")
        self.published.append((self.version, time.time()))
        return self.version

    def close(self) -> None:
        if self._onnx is None:
            self._redis.close()


def _build_onnx() -> tuple[Callable[..., Any], bytes, list[str]]:
    """A small MLP trained on random data and exported to ONNX by the project's own batch path."""
    import numpy as np

    from online_training.batch import NUMERIC_FEATURES, export_onnx, train_mlp
    from online_training.publish import publish_model_version

    rng = np.random.default_rng(5)
    names = list(NUMERIC_FEATURES)
    x = rng.normal(size=(2000, len(names))).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=2000) > 1.0).astype(np.float32)
    module = train_mlp(x, y, epochs=3, device="cpu")
    return publish_model_version, export_onnx(module, names), names


# --- servers --------------------------------------------------------------------------------------------


def start_tide(env: dict[str, str], port: int, run_dir: Path) -> subprocess.Popen[bytes]:
    log_path = run_dir / "logs" / "serve.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tide.cli", "serve"],
            env={**os.environ, **env, "TIDE_SERVE_PORT": str(port), "TIDE_SERVE_WORKERS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    wait_http(lambda: http("GET", base + "/readyz", timeout=2)[0] == 200, proc, "tide serve", log_path)
    return proc


def start_ceiling(port: int, template: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    log_path = run_dir / "logs" / "ceiling.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.serving_ceiling", "--port", str(port), "--template", str(template)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/healthz"
    wait_http(lambda: http("GET", url, timeout=2)[0] == 200, proc, "ceiling", log_path)
    return proc


def setup_feast(info: Any, values: Path, run_dir: Path) -> dict[str, Any]:
    repo, result = run_dir / "feast-repo", run_dir / "feast-setup.json"
    redis_addr = info.redis_url.removeprefix("redis://").split("/")[0]
    cmd = [str(FEAST_PYTHON), "-m", "bench.serving_feast", "setup", "--repo", str(repo)]
    cmd += ["--redis", redis_addr, "--values", str(values), "--result", str(result)]
    log_path = run_dir / "logs" / "feast-setup.log"
    with log_path.open("wb") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
    if not result.exists():
        raise RuntimeError(f"feast setup failed ({code}):\n{tail(log_path)}")
    out_json: dict[str, Any] = json.loads(result.read_text())
    if code != 0:
        raise RuntimeError(f"feast answers other values than Tide: {out_json['mismatches'][:5]}")
    return out_json


def start_feast(port: int, run_dir: Path, feast_body: dict[str, Any]) -> subprocess.Popen[bytes]:
    """``feast serve``: gunicorn, one uvicorn worker; worker recycling off (it defaults to every 1,000
    requests, which would restart the worker many times a second under load)."""
    log_path = run_dir / "logs" / "feast.log"
    cmd = [str(FEAST_CLI), "-c", str(run_dir / "feast-repo"), "serve", "-h", "127.0.0.1", "-p", str(port)]
    cmd += ["-w", "1", "--no-access-log", "--max-requests", "0", "--max-requests-jitter", "0"]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/get-online-features"
    wait_http(lambda: http("POST", url, feast_body, timeout=2)[0] == 200, proc, "feast serve", log_path, 180)
    return proc
