"""The Feast side of ``make bench-serving``; runs in ``.venv-feast`` (``make bench-feast-venv``).

Feast pins redis-py 7 (Tide's lock has 8) and brings pandas, pyarrow, dask and FastAPI, so it has its own
venv, and this module imports nothing of Tide. ``setup`` writes a local feature repository whose online
store is the benchmark's Redis, registers one feature view holding every online feature the benchmarked
model reads (Tide keeps them in several views of the same entity; same entity, feature names and types),
and writes the values Tide serves for every entity into it with
``FeatureStore.write_to_online_store`` — the same numbers, materialised, so both servers answer the same
features from the same Redis server. The server itself is Feast's own ``feast serve`` (gunicorn with one
uvicorn worker), started by the harness.

    .venv-feast/bin/python -m bench.serving_feast setup --repo DIR --redis 127.0.0.1:6379 --values FILE
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

PROJECT = "tide_bench"

REPO_YAML = """\
project: {project}
registry: {registry}
provider: local
online_store:
  type: redis
  connection_string: "{redis}"
offline_store:
  type: file
entity_key_serialization_version: 3
"""


def setup(repo: Path, redis: str, values_file: Path) -> dict[str, Any]:
    """Create the repository, apply the definitions and write every entity's values; returns a summary."""
    import pandas as pd
    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64, String

    spec = json.loads(values_file.read_text())
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(
        REPO_YAML.format(project=PROJECT, registry=(repo / "registry.db").resolve(), redis=redis)
    )
    entity_col, view_name = spec["entity"], spec["view"]
    dtypes = {"Int64": Int64, "Float64": Float64, "String": String}
    columns = {f["name"]: f["dtype"] for f in spec["features"]}
    rows = []
    for row in spec["rows"]:
        out: dict[str, Any] = {
            entity_col: row["entity"],
            "event_timestamp": datetime.fromtimestamp(row["event_ms"] / 1000, UTC),
        }
        for name, dtype in columns.items():
            v = row["values"][name]
            out[name] = int(v) if dtype == "Int64" else (str(v) if dtype == "String" else float(v))
        rows.append(out)
    frame = pd.DataFrame(rows)
    source_path = (repo / f"{view_name}.parquet").resolve()
    frame.to_parquet(source_path)  # the view's batch source; serving reads only the online store

    entity = Entity(name=entity_col, join_keys=[entity_col], value_type=ValueType.STRING)
    view = FeatureView(
        name=view_name,
        entities=[entity],
        ttl=timedelta(milliseconds=int(spec["ttl_ms"])) if spec.get("ttl_ms") else timedelta(days=7),
        schema=[Field(name=n, dtype=dtypes[d]) for n, d in columns.items()],
        online=True,
        source=FileSource(path=str(source_path), timestamp_field="event_timestamp"),
    )
    store = FeatureStore(repo_path=str(repo))
    store.apply([entity, view])
    started = time.perf_counter()
    store.write_to_online_store(view_name, frame)
    wrote_s = time.perf_counter() - started
    # Read a few back through Feast's own online path: what the server will answer.
    sample = [r[entity_col] for r in rows[:: max(1, len(rows) // 5)]][:5]
    refs = [f"{view_name}:{n}" for n in columns]
    got = store.get_online_features(features=refs, entity_rows=[{entity_col: e} for e in sample]).to_dict()
    mismatches = []
    by_entity = {r[entity_col]: r for r in rows}
    for i, e in enumerate(sample):
        for n in columns:
            want, have = by_entity[e][n], got[n][i]
            if isinstance(want, float) and isinstance(have, float):
                same = abs(want - have) <= 1e-9 * max(1.0, abs(want))
            else:
                same = want == have
            if not same:
                mismatches.append({"entity": e, "feature": n, "tide": want, "feast": have})
    from importlib.metadata import version

    return {
        "entities": len(rows),
        "features": refs,
        "write_to_online_store_s": round(wrote_s, 2),
        "checked_entities": sample,
        "mismatches": mismatches,
        "versions": {"feast": version("feast"), "redis (feast venv)": version("redis")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving_feast", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="feature repo + apply + write Tide's values to Feast's online store")
    s.add_argument("--repo", type=Path, required=True)
    s.add_argument("--redis", required=True, help="host:port of the Redis server")
    s.add_argument("--values", type=Path, required=True, help="JSON written by bench.serving")
    s.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)
    result = setup(args.repo, args.redis, args.values)
    args.result.write_text(json.dumps(result, indent=2, default=str))
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
