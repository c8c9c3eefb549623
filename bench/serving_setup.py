"""What ``make bench-serving`` sets up before it measures: online features, model versions, servers.

- Definitions: the fraud example (``examples/fraud``, loaded by :func:`fraud_project`) is applied to the
  benchmark's namespace, as ``tide apply`` does; ``tide serve`` and ``tide features`` read it from the
  registry and import its code from ``TIDE_PROJECT``.
- Features: generated transactions for E cards are produced to the ``transactions`` source in event-time
  order (spread over the last ``span`` minutes, so the sliding hour holds several tiles per entity) and
  the real feature processor (``tide features``) folds them into Redis. Completion and the values are
  read through the store's public read API (``RedisOnlineStore.read_many``), never its keys.
- Models: :class:`Publisher` publishes versions of model ``fraud`` to the models topic with
  ``online_training.publish.publish_model_version``: an ONNX MLP over the model's numeric inputs built by
  the project's batch path when that works, else the example's river pipeline (its learner factory),
  trained a little. The flavor used is recorded.
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
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fraud"
MODEL = "fraud"
SOURCE = "transactions"


def fraud_project() -> Any:
    """The fraud example's definitions (its code importable by module name from here on)."""
    from tide.project import load_project

    return load_project(EXAMPLE)


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
    project: Any,
    entities: int,
    per_entity: int,
    span_min: float,
    run_dir: Path,
) -> dict[str, Any]:
    """Produce ``entities * per_entity`` transactions and run ``tide features`` until all are in Redis."""
    from bench.features import SourceProducer, generate
    from tide.processes import Services

    source = project.sources[SOURCE]
    view = project.views["card_activity"]
    total = entities * per_entity
    now_ms = int(time.time() * 1000)
    first_ms = now_ms - int(span_min * 60_000)
    sender = SourceProducer(
        settings, source, validate=False, **{"linger.ms": 20, "batch.num.messages": 10000}
    )
    for i, event in enumerate(generate(total, entities, seed=23, key=source.key)):
        event[source.key] = entity_id(int(event[source.key].rpartition("-")[2]))
        event[source.event_time] = first_ms + (now_ms - first_ms) * i // total  # event-time order
        sender.send(event)
    sender.flush()
    services = Services(env | {"TIDE_FEATURES_GROUP": "bench-serving-fill"}, run_dir / "logs")
    started = time.perf_counter()
    proc = services.start("features", "features")
    ids = [entity_id(i) for i in range(entities)]
    counted = 0
    try:
        deadline = time.monotonic() + 120 + total / 500
        while True:
            rows = read_rows(settings, [view], ids)[view.name]
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


def feast_values(settings: Any, project: Any, entities: int, path: Path) -> dict[str, Any]:
    """Tide's current values of the model's online features for every entity, as the Feast side will
    write them: one Feast view holding every feature the model reads (from its several Tide views)."""
    model = project.models[MODEL]
    views = project.model_views(model)
    wanted = {view: [f for v, f in model.feature_refs if v == view.name] for view in views}
    ids = [entity_id(i) for i in range(entities)]
    by_view = read_rows(settings, views, ids)
    integer_kinds = {"count", "distinct"}
    features = []
    for view, names in wanted.items():
        kinds = {a.name: a.kind for a in view.aggregations}
        features += [{"name": n, "dtype": "Int64" if kinds[n] in integer_kinds else "Float64"} for n in names]
    rows = []
    for i, entity in enumerate(ids):
        per_view = [by_view[view.name][i] for view in views]
        values = {
            n: row.values[n] for row, names in zip(per_view, wanted.values(), strict=True) for n in names
        }
        newest = max((r.newest_event_ms or 0) for r in per_view) or int(time.time() * 1000)
        rows.append({"entity": entity, "event_ms": newest, "values": values})
    spec = {
        "view": f"{MODEL}_inputs",
        "entity": views[0].entity_key,
        "ttl_ms": min(v.ttl_ms for v in views if v.ttl_ms) if any(v.ttl_ms for v in views) else None,
        "features": features,
        "rows": rows,
    }
    path.write_text(json.dumps(spec))
    statuses = [r.status for rows_ in by_view.values() for r in rows_]
    return {"status": {s: statuses.count(s) for s in ("present", "missing", "expired")}}


# --- model versions -------------------------------------------------------------------------------------


class Publisher:
    """Publishes versions of model ``fraud`` (ONNX when the project can build one, else river)."""

    def __init__(self, settings: Any, project: Any, prefer_onnx: bool = True) -> None:
        from infra.kafka import make_producer

        self.settings = settings
        self.model = project.models[MODEL]
        self.version = 0
        self.published: list[tuple[int, float]] = []  # (version, wall time)
        self.flavor = "river"
        self.onnx_unavailable_reason: str | None = None
        self._artifact, self._names = b"", list(self.model.input_names)
        if prefer_onnx:
            try:
                self._artifact, self._names = _build_onnx(project)
                self.flavor = "onnx"
            except Exception as exc:  # the batch path is optional here: torch may not be installed
                self.onnx_unavailable_reason = f"{type(exc).__name__}: {exc}"
        if self.flavor == "river":
            self._artifact = _build_river(self.model)
        # One producer for every version: a new one per version would put its connection set-up into
        # the measured swap delay.
        self._producer = make_producer(settings)

    def publish(self) -> int:
        from online_training.publish import publish_model_version

        self.version += 1
        publish_model_version(
            self.settings,
            model=MODEL,
            version=self.version,
            flavor=self.flavor,
            artifact=self._artifact,
            feature_names=self._names,
            metric_name="bench",
            metric_value=0.5,
            producer=self._producer,
        )
        if self._producer.flush(10):
            raise RuntimeError("model version not delivered")
        self.published.append((self.version, time.time()))
        return self.version

    def close(self) -> None:
        self._producer.flush(5)


def _numeric_inputs(project: Any) -> list[str]:
    from models.inputs import model_inputs

    inputs = model_inputs(project)[MODEL]
    return [n for n in inputs.names if n not in inputs.strings([n])]


def _build_onnx(project: Any) -> tuple[bytes, list[str]]:
    """A small MLP over the model's numeric inputs, trained on random data and exported to ONNX by the
    project's own batch path."""
    import numpy as np

    from online_training.batch import export_onnx, train_mlp

    rng = np.random.default_rng(5)
    names = _numeric_inputs(project)
    x = rng.normal(size=(2000, len(names))).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=2000) > 1.0).astype(np.float32)
    module = train_mlp(x, y, epochs=3, device="cpu")
    return export_onnx(module, names), names


def _build_river(model: Any) -> bytes:
    """The example's river pipeline (its learner factory), trained on a few synthetic transactions."""
    import random

    from infra.imports import import_object
    from models.artifacts import dump_river

    learner = import_object(str(model.learner))()
    rng = random.Random(5)
    for _ in range(500):
        amount = rng.lognormvariate(3.5, 1.0)
        x = {
            "amount": amount,
            "category": rng.choice(["grocery", "travel", "fuel"]),
            "country": rng.choice(["US", "GB", "FR"]),
            "card_present": rng.random() < 0.7,
            "txn_count_1h": rng.randint(0, 5),
            "amount_mean_1h": amount * rng.uniform(0.5, 1.5),
        }
        learner.learn_one(x, amount > 150 and not x["card_present"])
    return dump_river(learner)[0]


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
