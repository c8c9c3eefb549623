"""``make bench-learn``: the online learner inside Tide's trainer beside bare river, in one run.

A small project (written to the run directory, applied to each namespace as ``tide apply`` does) declares
a source of river's bundled synthetic stream ``synth.Agrawal`` (nine inputs, a binary target), its labels
and a model whose learner is a river pipeline (``--learner``: ``linear`` = StandardScaler |
LogisticRegression, ``tree`` = HoeffdingTreeClassifier). On a private embedded stack (tansu + Redis on
free ports), N events and their labels are produced; the examples are replayed point-in-time from the
topics (what the trainer learns an event never scored from), then, interleaved per rep:

(a) river: ``river.evaluate.progressive_val_score`` over those examples, in order, with a new learner
    from the same factory and the model's metric (ROCAUC): the bare loop; and, for context, the same
    loop pickling its learner every ``publish_every`` examples (as anything that keeps versions must);
(b) Tide: the trainer's step learning the same examples in the same order, in batches of 500 as it
    learns a polled batch, with everything it does per example and per batch: progressive metric,
    reference sample, learnt markers and learn log in Redis, a version published every
    ``publish_every`` labels (pickled learner, profile, produced to the models topic). ``identical`` is
    true when every prediction in its learn log equals bare river's, bit for bit;
(c) end to end, for context: ``trainer.run`` on a fresh namespace where every event was scored (its
    prediction, with the inputs served, on the predictions topic): labels/s from the first label learnt
    to the last, including consuming and decoding both topics, the join in Redis and the checkpoints;
    and a trainer starting on history (no version yet: it replays the topics point-in-time and learns
    everything, then publishes), labels/s over its whole start.

Figures are medians of ``--reps`` runs. Results go to ``out/bench/learn.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.learn")

OUT_DIR = Path("out/bench")
RESULT_FILE = OUT_DIR / "learn.json"
RUN_DIR = OUT_DIR / "learn-run"
MODEL = "agrawal"
T0 = 1_700_000_000_000
GOALS = {"tide_vs_river": 0.7}
LEARNERS = {
    "linear": "preprocessing.StandardScaler() | linear_model.LogisticRegression()",
    "tree": "tree.HoeffdingTreeClassifier(grace_period=200)",
}


# --- the project and its data -------------------------------------------------------------------------------


def write_project(root: Path, learner: str, partitions: int, publish_every: int = 500) -> Any:
    from river import datasets

    from tide.project import load_project

    x, _ = next(iter(datasets.synth.Agrawal(seed=1)))
    fields = [{"name": "event_id", "type": "string"}]
    fields += [{"name": k, "type": "long" if isinstance(v, int) else "double"} for k, v in x.items()]
    fields.append({"name": "ts", "type": "long"})
    outcome = [
        {"name": "event_id", "type": "string"},
        {"name": "positive", "type": "boolean"},
        {"name": "ts", "type": "long"},
    ]
    (root / "schemas").mkdir(parents=True, exist_ok=True)
    (root / "schemas" / "point.avsc").write_text(
        json.dumps({"type": "record", "name": "Point", "fields": fields})
    )
    (root / "schemas" / "outcome.avsc").write_text(
        json.dumps({"type": "record", "name": "Outcome", "fields": outcome})
    )
    (root / "bench_learner.py").write_text(
        textwrap.dedent(
            f"""
            from river import linear_model, preprocessing, tree


            def new_model():
                return {LEARNERS[learner]}
            """
        )
    )
    (root / "definitions.py").write_text(
        textwrap.dedent(
            f"""
            from tide import Labels, Model, Source

            PROJECT_NAME = "bench_learn"
            points = Source("points", "schemas/point.avsc", "event_id", "ts", partitions={partitions})
            outcomes = Source("outcomes", "schemas/outcome.avsc", "event_id", "ts", partitions={partitions})
            positive = Labels("positive", outcomes, key="event_id", target="positive", task="binary")
            {MODEL} = Model(
                "{MODEL}",
                task="binary",
                request=points,
                request_fields={list(x)!r},
                labels=positive,
                learner="bench_learner:new_model",
                metric="ROCAUC",
                publish_every={publish_every},
                monitor=["salary", "age"],
            )
            """
        )
    )
    return load_project(root)


def rows_of(n: int, seed: int) -> list[tuple[dict[str, Any], bool]]:
    from river import datasets

    return [(x, bool(y)) for x, y in datasets.synth.Agrawal(seed=seed).take(n)]


def namespace(info: Any, prefix: str, project: Any, root: Path, **overrides: Any) -> Any:
    from online_training.settings import TrainerSettings
    from schemas.registry import register_schemas
    from tide.plan import apply

    settings = info.settings(
        TrainerSettings,
        **{
            "topic_prefix": prefix,
            "project": root,
            "trainer_group": f"{prefix}trainer",
            "log_level": "WARNING",
            "trainer_learn_log": 10_000_000,  # every prediction, to check them all
            **overrides,
        },
    )
    apply(settings, project)
    register_schemas(project)
    return settings


def produce(
    settings: Any, project: Any, rows: list[tuple[dict[str, Any], bool]], *, events: bool, scored: bool
) -> None:
    from infra.kafka import make_producer
    from infra.topics import topic
    from schemas import codec
    from tide import Client

    client = Client(settings, project, 1)
    if events:
        client.produce("points", [{"event_id": f"e{i}", **x, "ts": T0 + i} for i, (x, _) in enumerate(rows)])
    if scored:
        producer = make_producer(settings)
        for i, (x, _) in enumerate(rows):
            record = {
                "request_id": f"r{i}",
                "event_id": f"e{i}",
                "model": MODEL,
                "version": 1,
                "arm": "champion",
                "features": x,
                "score": 0.5,
                "latency_ms": 1.0,
                "ts": T0 + i,
            }
            producer.produce(
                topic(settings, "predictions"), key=f"e{i}".encode(), value=codec.encode("prediction", record)
            )
            if i % 10_000 == 0:
                producer.poll(0)
        if producer.flush(60):
            raise RuntimeError("predictions not delivered")
    client.produce(
        "outcomes", [{"event_id": f"e{i}", "positive": y, "ts": T0 + i + 1} for i, (_, y) in enumerate(rows)]
    )


# --- the contenders -----------------------------------------------------------------------------------------


def run_river(factory: Any, examples: list[Any]) -> dict[str, Any]:
    from river import evaluate, metrics

    stream = [(e.x, e.y) for e in examples]
    learner, metric = factory(), metrics.ROCAUC()
    started = time.perf_counter()
    evaluate.progressive_val_score(stream, learner, metric)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), "per_s": round(len(stream) / seconds, 1), "metric": metric.get()}


def run_river_snapshots(factory: Any, examples: list[Any], every: int) -> dict[str, Any]:
    """Bare river's loop that also pickles the learner every ``every`` examples, as anything that keeps
    versions of it must. (On CPython 3.11 a learner once pickled learns more slowly from then on: pickling
    reads each object's ``__dict__``, which turns its attributes from inline values into a real dict.)"""
    import pickle

    from river import metrics

    learner, metric = factory(), metrics.ROCAUC()
    predict, update, learn = learner.predict_proba_one, metric.update, learner.learn_one
    started = time.perf_counter()
    for i, e in enumerate(examples, 1):
        y_pred = predict(e.x)
        if y_pred:
            update(y_true=e.y, y_pred=y_pred)
        learn(e.x, e.y)
        if i % every == 0:
            pickle.dumps(learner, protocol=pickle.HIGHEST_PROTOCOL)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), "per_s": round(len(examples) / seconds, 1), "metric": metric.get()}


def river_predictions(factory: Any, stream: list[tuple[dict[str, Any], Any]]) -> list[Any]:
    import orjson
    from river import evaluate, metrics

    steps = evaluate.iter_progressive_val_score(stream, factory(), metrics.ROCAUC(), yield_predictions=True)
    as_json = orjson.OPT_NON_STR_KEYS  # as the learn log carries them
    return [orjson.loads(orjson.dumps(step["Prediction"], option=as_json)) for step in steps]


def run_tide(settings: Any, project: Any, examples: list[Any]) -> dict[str, Any]:
    import redis

    from infra.kafka import make_transactional_producer
    from online_training import trainer
    from online_training.joins import JoinStore
    from online_training.learner import OnlineModel, build_learner

    model = project.models[MODEL]
    client = redis.Redis.from_url(settings.redis_url)
    # As in the trainer: versions go out in a transaction committed at each checkpoint (there with the
    # consumed offsets; here there are none).
    producer = make_transactional_producer(settings, f"{settings.topic_prefix}bench")
    producer.init_transactions()
    producer.begin_transaction()
    store = JoinStore(client, settings.topic_prefix, MODEL, settings.trainer_join_ttl_s)
    store.start_epoch(0)
    online = OnlineModel(
        model,
        build_learner(model),
        reference_size=settings.trainer_reference_size,
    )
    step = trainer.TrainerStep(settings, project, producer, {MODEL: (online, store)})
    started = time.perf_counter()
    for start in range(0, len(examples), 500):  # as the trainer learns one polled batch, then checkpoints
        step.learn(MODEL, examples[start : start + 500])
        if step.idle():
            producer.commit_transaction()
            producer.begin_transaction()
    producer.commit_transaction()
    seconds = time.perf_counter() - started
    client.close()
    entries = trainer.learn_log(settings, MODEL)
    return {
        "seconds": round(seconds, 4),
        "per_s": round(len(examples) / seconds, 1),
        "metric": online.metric_value(),
        "versions": online.version,
        "log": entries,
    }


def run_served(info: Any, project: Any, root: Path, rows: list[Any], prefix: str) -> dict[str, Any]:
    """``trainer.run`` over predictions and labels already on the topics (events never replayed)."""
    from prometheus_client import REGISTRY

    from online_training import trainer

    settings = namespace(info, prefix, project, root, trainer_prediction_grace_s=3600)
    produce(settings, project, rows, events=False, scored=True)

    def learnt() -> int:  # the trainer's own counter (this process's, summed over reps)
        labels = {"model": MODEL, "path": "served"}
        return int(REGISTRY.get_sample_value("tide_trainer_labels_learnt_total", labels) or 0)

    before = learnt()
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(settings, project, stop), daemon=True)
    thread.start()
    first_t, first_n = None, 0
    deadline = time.monotonic() + 600
    n = 0
    while time.monotonic() < deadline:
        n = learnt() - before
        now = time.perf_counter()
        if n and first_t is None:
            first_t, first_n = now, n
        if n >= len(rows):
            break
        time.sleep(0.005)
    last_t = time.perf_counter()
    stop.set()
    thread.join(30)
    if n < len(rows) or first_t is None:
        raise RuntimeError(f"the trainer learnt {n} of {len(rows)} labels")
    entries = trainer.learn_log(settings, MODEL)
    return {
        "seconds": round(last_t - first_t, 4),
        "per_s": round((len(rows) - first_n) / max(last_t - first_t, 1e-9), 1),
        "log": entries,
    }


def run_bootstrap(info: Any, project: Any, root: Path, rows: list[Any], prefix: str) -> dict[str, Any]:
    """A trainer starting on history: replays the topics point-in-time, learns it all, publishes."""
    import redis

    from features.versions import mark_live
    from infra.kafka import make_producer
    from online_training import trainer

    settings = namespace(info, prefix, project, root)
    produce(settings, project, rows, events=True, scored=False)
    client = redis.Redis.from_url(settings.redis_url)
    mark_live(client, settings.topic_prefix, list(project.view_versions))  # no feature processor runs here
    started = time.perf_counter()
    step = trainer.restore(settings, project, make_producer(settings), client)
    seconds = time.perf_counter() - started
    client.close()
    learnt = step.states[MODEL].online.trained_on
    if learnt != len(rows):
        raise RuntimeError(f"the bootstrap learnt {learnt} of {len(rows)} labels")
    return {"seconds": round(seconds, 4), "per_s": round(len(rows) / seconds, 1)}


# --- the run ------------------------------------------------------------------------------------------------


def reproduce_command(args: argparse.Namespace) -> str:
    extra = f" --learner {args.learner}" if args.learner != "linear" else ""
    extra += f" --publish-every {args.publish_every}" if args.publish_every != 500 else ""
    extra += " --skip-end-to-end" * args.skip_end_to_end
    make_args = f' BENCH_ARGS="{extra.strip()}"' if extra else ""
    return (
        f"make bench-learn BENCH_LEARN_EXAMPLES={args.examples} BENCH_REPS={args.reps}{make_args}"
        f"   # = .venv/bin/python -m bench.learn --examples {args.examples} --reps {args.reps}{extra}"
    )


def median(runs: list[dict[str, Any]]) -> float:
    return round(statistics.median(r["per_s"] for r in runs), 1)


def bench(args: argparse.Namespace) -> int:
    import shutil

    from infra.imports import import_object
    from online_training.history import all_examples
    from tide.embedded import EmbeddedStack

    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    RUN_DIR.mkdir(parents=True)
    print(f"reproduce: {reproduce_command(args)}", flush=True)
    started = time.perf_counter()
    root = RUN_DIR / "project"
    project = write_project(root, args.learner, args.partitions, args.publish_every)
    factory = import_object("bench_learner:new_model")
    rows = rows_of(args.examples, args.seed)
    with EmbeddedStack(RUN_DIR / "stack") as info:
        base = namespace(info, "bench-learn.", project, root)
        produce(base, project, rows, events=True, scored=False)
        examples = all_examples(base, project, project.models[MODEL])  # what the trainer learns, in order
        if len(examples) != len(rows):
            raise RuntimeError(f"replayed {len(examples)} examples of {len(rows)}")
        expected = river_predictions(factory, [(e.x, e.y) for e in examples])
        every = project.models[MODEL].publish_every
        runs: dict[str, list[dict[str, Any]]] = {
            "river": [],
            "river_snapshots": [],
            "tide": [],
            "served": [],
            "bootstrap": [],
        }
        identical = True
        for rep in range(args.reps):
            # interleaved, so drift in the machine's load hits both alike
            # The harness's own heap (examples, expected predictions) is frozen: neither contender's time
            # includes the garbage collector walking it.
            gc.collect()
            gc.freeze()
            runs["river"].append(run_river(factory, examples))
            runs["river_snapshots"].append(run_river_snapshots(factory, examples, every))
            settings = namespace(info, f"bench-learn-{rep}.", project, root)
            tide = run_tide(settings, project, examples)
            identical &= [e["y_pred"] for e in tide.pop("log")] == expected
            runs["tide"].append(tide)
            if not args.skip_end_to_end:
                served = run_served(info, project, root, rows, f"bench-served-{rep}.")
                entries = served.pop("log")
                by_key = {f"e{i}": row for i, row in enumerate(rows)}
                in_order = river_predictions(factory, [by_key[e["key"]] for e in entries])
                identical &= [e["y_pred"] for e in entries] == in_order
                runs["served"].append(served)
                runs["bootstrap"].append(run_bootstrap(info, project, root, rows, f"bench-boot-{rep}."))
            print(
                f"rep {rep + 1}/{args.reps}: "
                + ", ".join(f"{k} {v[-1]['per_s']:,.0f}/s" for k, v in runs.items() if v)
                + f"; identical so far: {identical}",
                flush=True,
            )
    river, tide = median(runs["river"]), median(runs["tide"])
    snapshots = median(runs["river_snapshots"])
    e2e = {k: median(runs[k]) for k in ("served", "bootstrap") if runs[k]}
    result = {
        "benchmark": "learn",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reproduce": reproduce_command(args),
        "tide_per_s": tide,
        "river_per_s": river,
        "identical": identical,
        "river_snapshots_per_s": snapshots,
        "ratios": {
            "tide_vs_river": round(tide / river, 3),
            "tide_vs_river_snapshots": round(tide / snapshots, 3),
        }
        | {f"{k}_vs_river": round(v / river, 3) for k, v in e2e.items()},
        "end_to_end_per_s": e2e,
        "goals": GOALS,
        "goals_met": {"tide_vs_river": tide / river >= GOALS["tide_vs_river"]},
        "learner": LEARNERS[args.learner],
        "dataset": f"river.datasets.synth.Agrawal(seed={args.seed})",
        "examples": len(rows),
        "partitions": args.partitions,
        "publish_every": project.models[MODEL].publish_every,
        "runs": runs,
        "reps": args.reps,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2, default=str) + "\n")
    goal = GOALS["tide_vs_river"]
    print(
        f"river {river:,.0f}/s (pickled every {every}: {snapshots:,.0f}/s), Tide's trainer {tide:,.0f}/s "
        f"({tide / river:.2f}x, goal {goal}x; {tide / snapshots:.2f}x of river pickled as often)"
    )
    for k, v in e2e.items():
        print(f"end to end, {k}: {v:,.0f}/s ({v / river:.2f}x)")
    print(f"identical predictions: {identical}")
    print(f"wrote {RESULT_FILE}")
    print(f"reproduce: {result['reproduce']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20_000, help="labelled events in the stream")
    parser.add_argument("--reps", type=int, default=3, help="runs of each contender (medians reported)")
    parser.add_argument("--learner", choices=sorted(LEARNERS), default="linear")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--publish-every", type=int, default=500, help="the model's publish_every")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-end-to-end", action="store_true", help="only (a) and (b)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
