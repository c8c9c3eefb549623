"""The trainer's state in Redis, per model: served inputs and labels waiting for each other, labels
waiting to be learnt from replayed features, what was learnt (markers) and the learn log.

Keys live under ``<topic prefix>tide:train:<model>:<lineage>:`` (one set per lineage of the model: a
lineage's learner learns each label once, whatever another lineage learnt; see
:mod:`online_training.lineage`), the learn log under ``<topic prefix>tide:train:<model>:log``. Per-label
state is kept in hashes, one per time
bucket of the join TTL (written to the newest, read from the newest two, each expiring two TTLs after its
last write), so a batch of any size costs a few Redis commands, and every entry lives at least one TTL:

- ``p:<bucket>``: the inputs served for the event, by labels key (from its prediction);
- ``l:<bucket>``: labels waiting for their prediction, by key (``{"k": key, "y": target, "t": time, "s":
  first seen}``);
- ``done:<bucket>``: the learnt markers, ``"<epoch>:<version>"`` by key: which trainer run (epoch) learnt
  the label and into which version of the model it went;
- ``pending``: a sorted set of the keys of waiting labels, scored by when they are due for replay;
- ``epoch`` / ``epochs``: the run counter, and each ended run's last committed version;
- ``log`` (per model, every lineage's): the learn log, one JSON entry per label learnt, in learning order
  (one list item per entry; items written before held a batch each), trimmed to the newest
  ``trainer_learn_log`` entries.

Why markers carry an epoch and a version: Redis is written before the Kafka transaction that publishes
the version commits. A run that crashes leaves markers for labels its learner had learnt but no
committed version holds. When a run starts, it restores the newest committed version ``N`` and records
``N`` as the last committed version of the run before it. A marker then counts as learnt when it is the
current run's own, or when its version is at most the last committed version of its run: it is in the
learner the current run restored. Any other marker is ignored, so the label is learnt again, once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis

LOG_FIELDS = ("epoch", "version", "key", "path", "y", "y_pred")


@dataclass(frozen=True)
class Waiting:
    """A label waiting for its prediction: the raw labels key, the raw target, the label's time and when
    the trainer first saw it (ms, wall clock)."""

    key: Any
    y: Any
    ts: int | None
    seen_ms: int = 0

    def dumps(self) -> bytes:
        return orjson.dumps({"k": self.key, "y": self.y, "t": self.ts, "s": self.seen_ms})

    @classmethod
    def loads(cls, blob: bytes) -> Waiting:
        d = orjson.loads(blob)
        return cls(d["k"], d["y"], d["t"], d.get("s", 0))


class JoinStore:
    """One model's trainer state (see the module docstring). Call :meth:`start_epoch` once per run."""

    def __init__(
        self, client: redis.Redis, namespace: str, model: str, ttl_s: int, lineage: str = ""
    ) -> None:
        self.client = client
        self.model = model
        self.lineage = lineage
        self.ttl_s = ttl_s
        self.bucket_ms = ttl_s * 1000
        base = f"{namespace}tide:train:{model}:"
        # The lineage "" is the one that predates lineages: its keys are where they always were.
        self.prefix = f"{base}{lineage}:" if lineage else base
        self.log_key = f"{base}log"
        self.epoch = 0
        self.committed: dict[int, int] = {}  # ended run -> its last committed version

    def key(self, kind: str, suffix: str = "") -> str:
        return f"{self.prefix}{kind}:{suffix}" if suffix else f"{self.prefix}{kind}"

    def _newest(self) -> int:
        return now_ms() // self.bucket_ms

    def _put(self, pipe: Any, kind: str, mapping: Mapping[str, bytes]) -> None:
        if mapping:
            name = self.key(kind, str(self._newest()))
            pipe.hset(name, mapping=mapping)
            pipe.expire(name, 2 * self.ttl_s)

    def _get(self, pipe: Any, kind: str, keys: Sequence[str]) -> None:
        newest = self._newest()
        pipe.hmget(self.key(kind, str(newest)), keys)
        pipe.hmget(self.key(kind, str(newest - 1)), keys)

    @staticmethod
    def _merge(newer: list[bytes | None], older: list[bytes | None]) -> list[bytes | None]:
        return [a if a is not None else b for a, b in zip(newer, older, strict=True)]

    # --- runs and markers -----------------------------------------------------------------------------

    def start_epoch(self, restored_version: int) -> int:
        """Begin a run that restored version ``restored_version``: the previous run's markers count up
        to that version."""
        self.epoch = int(self.client.incr(self.key("epoch")))
        if self.epoch > 1:
            self.client.hset(self.key("epochs"), str(self.epoch - 1), str(restored_version))
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.key("epochs")))
        self.committed = {int(k): int(v) for k, v in raw.items()}
        return self.epoch

    def learnt(self, marker: bytes | None) -> bool:
        """Whether a ``done`` marker says the current learner holds the label."""
        if not marker:
            return False
        epoch, _, version = marker.partition(b":")
        e, v = int(epoch), int(version)
        return e == self.epoch or v <= self.committed.get(e, 0)

    def committed_marker(self, marker: bytes | None, published: int) -> bool:
        """Whether a marker is of a label in a committed version (safe to forget it is waiting)."""
        if not marker:
            return False
        epoch, _, version = marker.partition(b":")
        e, v = int(epoch), int(version)
        return v <= published if e == self.epoch else v <= self.committed.get(e, 0)

    def marker(self, version: int) -> bytes:
        return f"{self.epoch}:{version}".encode()

    # --- the join -------------------------------------------------------------------------------------

    def exchange(
        self, served: Mapping[str, Mapping[str, Any]], labels: Iterable[str]
    ) -> tuple[dict[str, tuple[bytes | None, bytes | None]], dict[str, tuple[bytes | None, bytes | None]]]:
        """Park ``served`` inputs (by key) and look up, in one round trip, for each served key its waiting
        label and marker, and for each label key its parked inputs (this batch's included) and marker."""
        served_keys, label_keys = list(served), list(labels)
        pipe = self.client.pipeline(transaction=False)
        self._put(pipe, "p", {k: orjson.dumps(x) for k, x in served.items()})
        wanted = [("l", served_keys), ("done", served_keys), ("p", label_keys), ("done", label_keys)]
        for kind, keys in wanted:
            if keys:
                self._get(pipe, kind, keys)
        results = pipe.execute()[2 if served_keys else 0 :]
        found: list[list[bytes | None]] = []
        for _, keys in wanted:
            if keys:
                found.append(self._merge(results[0], results[1]))
                results = results[2:]
            else:
                found.append([])
        by_served = dict(zip(served_keys, zip(found[0], found[1], strict=True), strict=True))
        by_label = dict(zip(label_keys, zip(found[2], found[3], strict=True), strict=True))
        return by_served, by_label

    def record(
        self,
        learnt: Mapping[str, bytes],
        waiting: Mapping[str, Waiting],
        due_ms: int,
        log: Sequence[bytes] = (),
        log_max: int = 0,
    ) -> None:
        """Write markers of ``learnt`` keys, park ``waiting`` labels (due for replay at ``due_ms``) and
        append to the learn log, in one round trip."""
        if not (learnt or waiting or (log and log_max)):
            return
        pipe = self.client.pipeline(transaction=False)
        self._put(pipe, "done", learnt)
        self._put(pipe, "l", {k: label.dumps() for k, label in waiting.items()})
        if waiting:
            pipe.zadd(self.key("pending"), {k: due_ms for k in waiting}, nx=True)
        if log and log_max:
            # One list item per entry (a JSON array of one entry, as read_log reads a batch): the newest
            # log_max entries are kept, whatever the sizes of the batches they came in.
            pipe.rpush(self.log_key, *(b"[" + entry + b"]" for entry in log[-log_max:]))
            pipe.ltrim(self.log_key, -log_max, -1)
        pipe.execute()

    def parked(self, keys: Sequence[str]) -> list[Any]:
        """The parked served inputs of ``keys`` (None where there are none)."""
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        self._get(pipe, "p", keys)
        newer, older = pipe.execute()
        return [None if v is None else orjson.loads(v) for v in self._merge(newer, older)]

    # --- labels due for replay ------------------------------------------------------------------------

    def due(self, now_ms: int, limit: int) -> list[str]:
        raw = cast(
            list[bytes], self.client.zrangebyscore(self.key("pending"), "-inf", now_ms, start=0, num=limit)
        )
        return [k.decode() for k in raw]

    def waiting(self, keys: Sequence[str]) -> list[tuple[Waiting | None, bytes | None]]:
        """Each key's waiting label (None once expired) and its marker."""
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        self._get(pipe, "l", keys)
        self._get(pipe, "done", keys)
        la, lb, da, db = pipe.execute()
        labels, markers = self._merge(la, lb), self._merge(da, db)
        return [(None if w is None else Waiting.loads(w), m) for w, m in zip(labels, markers, strict=True)]

    def forget(self, keys: Iterable[str]) -> None:
        """Stop waiting for ``keys`` (learnt into a committed version, or expired)."""
        keys = list(keys)
        if keys:
            self.client.zrem(self.key("pending"), *keys)

    def postpone(self, due: Mapping[str, int]) -> None:
        """Look at waiting ``keys`` again when due (ms)."""
        if due:
            self.client.zadd(self.key("pending"), dict(due), xx=True)

    def pending_count(self) -> int:
        return int(self.client.zcard(self.key("pending")))

    # --- metric state and learn log -------------------------------------------------------------------

    def save_metric(self, version: int, blob: bytes) -> None:
        self.client.set(self.key("metric", str(version)), blob, ex=max(self.ttl_s, 7 * 86_400))

    def load_metric(self, version: int) -> bytes | None:
        value = cast(bytes | None, self.client.get(self.key("metric", str(version))))
        return value

    def clear_log(self) -> None:
        self.client.delete(self.log_key)


def log_entry(epoch: int, version: int, key: str, path: str, y: Any, y_pred: Any) -> bytes:
    return orjson.dumps([epoch, version, key, path, y, y_pred], option=orjson.OPT_NON_STR_KEYS)


def read_log(client: redis.Redis, namespace: str, model: str) -> list[dict[str, Any]]:
    """A model's learn log, oldest first: ``{epoch, version, key, path, y, y_pred}`` per label learnt,
    ``path`` ``served`` (the inputs logged with its prediction) or ``replayed`` (point-in-time features),
    ``y_pred`` the prediction made before learning it, as JSON carries it (class-probability keys as
    JSON strings: ``true`` and ``false`` for a binary model)."""
    batches = cast(list[bytes], client.lrange(f"{namespace}tide:train:{model}:log", 0, -1))
    return [dict(zip(LOG_FIELDS, entry, strict=True)) for batch in batches for entry in orjson.loads(batch)]


def now_ms() -> int:
    return int(time.time() * 1000)
