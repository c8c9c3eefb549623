"""Aggregations as mergeable partials: what one event contributes, how partials merge, what they mean.

A partial is a flat dict of named slots. Each slot's name says how it merges (all of them associative
and commutative, so tiles may be written in any order and merged in any grouping):

====================  ==============================================  ==================
slot                  holds                                           merges by
====================  ==============================================  ==================
``n``                 event count                                     addition
``s:F`` / ``q:F``     sum / sum of squares of field F                 addition
``min:F`` / ``max:F`` extreme of F                                    min / max
``h:F:B``             events whose F falls in log-bucket B            addition
``last:F``            (event time, value) of the newest F             the later time wins
``d:F``               the smallest DISTINCT_K hashes of F's values     union, keep the K
                      (a KMV sketch)                                   smallest
====================  ==============================================  ==================

Quantiles come from the log-bucket histogram (a DDSketch-style sketch): every value in bucket B lies
within a relative error of ``ALPHA`` of the bucket's representative value, whatever the distribution.
Distinct counts are approximate with bounded memory: a K-minimum-values sketch keeps the ``DISTINCT_K``
smallest 52-bit hashes of the values seen. Below K distinct values the count is exact; above, it is
estimated as (K - 1) / (K-th smallest hash, scaled to [0, 1)), with a relative standard error of about
1 / sqrt(K - 2) (6.3 % for K = 256). Unlike HyperLogLog registers the sketch is a plain sorted list,
so the Redis apply script merges it in the same packed field as every other slot.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from schemas.definitions import FeatureView

ALPHA = 0.01  # relative accuracy of quantiles
DISTINCT_K = 256  # hashes a distinct-count sketch keeps: exact below, ~6 % error above
HASH_SPACE = float(2**52)  # hashes are below this: exact as doubles (the Lua merge compares them)


_HASHES: dict[str, int] = {}  # value text -> hash: the values a stream repeats (categories, places)
_HASHES_MAX = 1 << 16


def value_hash(value: Any) -> int:
    """A value's 52-bit hash for distinct counting, the same in every process (unlike ``hash``)."""
    text = str(value)
    found = _HASHES.get(text)
    if found is None:
        found = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 12
        if len(_HASHES) >= _HASHES_MAX:
            _HASHES.clear()
        _HASHES[text] = found
    return found


def kmv(hashes: set[int]) -> set[int]:
    """The sketch of ``hashes``: its ``DISTINCT_K`` smallest."""
    return hashes if len(hashes) <= DISTINCT_K else set(sorted(hashes)[:DISTINCT_K])


def distinct_estimate(hashes: Iterable[int]) -> float:
    """The number of distinct values a sketch stands for (exact below ``DISTINCT_K``)."""
    smallest = sorted(hashes)[:DISTINCT_K]
    if len(smallest) < DISTINCT_K:
        return float(len(smallest))
    return (DISTINCT_K - 1) / ((smallest[-1] + 1) / HASH_SPACE)


GAMMA = (1 + ALPHA) / (1 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
ZERO_BUCKET = "z"  # values <= 0 (sizes, counts); the sketch is for non-negative quantities

Partial = dict[str, Any]


def bucket_of(value: float) -> str:
    return ZERO_BUCKET if value <= 0 else str(math.ceil(math.log(value) / _LOG_GAMMA))


def bucket_value(bucket: str) -> float:
    """The representative value of a bucket (within ALPHA of every value in it)."""
    if bucket == ZERO_BUCKET:
        return 0.0
    b = int(bucket)
    return 2 * GAMMA**b / (GAMMA + 1)


def partial_of(view: FeatureView, event: Mapping[str, Any]) -> Partial:
    """The partial one event contributes to its tile."""
    p: Partial = {"n": 1.0}
    ts = int(event[view.event_time])
    for agg in view.aggregations:
        f = agg.field
        if f is None:
            continue
        value = event[f]
        if agg.kind in ("sum", "mean", "stddev"):
            v = float(value)
            p["s:" + f] = v
            if agg.kind == "stddev":
                p["q:" + f] = v * v  # v * v, not v ** 2: a huge value overflows to inf instead of raising
        elif agg.kind in ("min", "max"):
            p[f"{agg.kind}:{f}"] = float(value)
        elif agg.kind == "quantile":
            p[f"h:{f}:{bucket_of(float(value))}"] = 1.0
        elif agg.kind == "last":
            p["last:" + f] = (ts, value)
        elif agg.kind == "distinct":
            p["d:" + f] = {value_hash(value)}
    return p


_FOLDS: dict[tuple[Any, ...], Callable[[Partial, Mapping[str, Any], int], None]] = {}


class Folder:
    """Folds events into a partial in place: the same slots and values as :func:`partial_of` then
    :func:`merge`, without building a partial per event (the processor's hot path).

    The view's fold is compiled once into straight-line code (its slots are known up front): an empty
    partial is filled with one dict literal, a started one updated slot by slot, with no loop over
    aggregation kinds per event.
    """

    def __init__(self, view: FeatureView) -> None:
        fields: dict[str, list[str]] = {}
        for agg in view.aggregations:
            if agg.field is not None:
                fields.setdefault(agg.kind, []).append(agg.field)
        self.sums = [("s:" + f, f) for k in ("sum", "mean", "stddev") for f in fields.get(k, ())]
        self.sums = list(dict.fromkeys(self.sums))  # a field summed by two features is one slot
        self.squares = [("q:" + f, f) for f in dict.fromkeys(fields.get("stddev", ()))]
        self.mins = [("min:" + f, f) for f in dict.fromkeys(fields.get("min", ()))]
        self.maxs = [("max:" + f, f) for f in dict.fromkeys(fields.get("max", ()))]
        self.hists = [(f"h:{f}:", f) for f in dict.fromkeys(fields.get("quantile", ()))]
        self.lasts = [("last:" + f, f) for f in dict.fromkeys(fields.get("last", ()))]
        self.distincts = [("d:" + f, f) for f in dict.fromkeys(fields.get("distinct", ()))]
        self.fold: Callable[[Partial, Mapping[str, Any], int], None] = self._compile()

    def _compile(self) -> Callable[[Partial, Mapping[str, Any], int], None]:
        """``fold(p, event, ts)`` for this view's slots, as generated code (names and fields are
        embedded as literals with ``repr``), compiled once per set of slots."""
        spec = tuple(
            tuple(slots)
            for slots in (
                self.sums,
                self.squares,
                self.mins,
                self.maxs,
                self.hists,
                self.lasts,
                self.distincts,
            )
        )
        found = _FOLDS.get(spec)
        if found is None:
            found = _FOLDS[spec] = self._generate()
        return found

    def _generate(self) -> Callable[[Partial, Mapping[str, Any], int], None]:
        numeric = list(
            dict.fromkeys(f for _, f in self.sums + self.squares + self.mins + self.maxs + self.hists)
        )
        var = {f: f"v{i}" for i, f in enumerate(numeric)}
        reads = [f"    {var[f]} = float(event[{f!r}])" for f in numeric]
        hashes = [f"    d{i} = value_hash(event[{f!r}])" for i, (_, f) in enumerate(self.distincts)]
        # a new partial: one dict literal (the slots in the order the loop version inserted them)
        literal = ['"n": 1.0']
        literal += [f"{slot!r}: {var[f]}" for slot, f in self.sums]
        literal += [f"{slot!r}: {var[f]} * {var[f]}" for slot, f in self.squares]
        literal += [f"{slot!r}: {var[f]}" for slot, f in self.mins + self.maxs]
        literal += [f"{prefix!r} + bucket_of({var[f]}): 1.0" for prefix, f in self.hists]
        literal += [f"{slot!r}: (ts, event[{f!r}])" for slot, f in self.lasts]
        literal += [f"{slot!r}: {{d{i}}}" for i, (slot, _) in enumerate(self.distincts)]
        started = ['        p["n"] = p.get("n", 0.0) + 1.0']
        started += [f"        p[{s!r}] = p.get({s!r}, 0.0) + {var[f]}" for s, f in self.sums]
        started += [f"        p[{s!r}] = p.get({s!r}, 0.0) + {var[f]} * {var[f]}" for s, f in self.squares]
        for ops, slots in (("<", self.mins), (">", self.maxs)):
            for s, f in slots:
                started.append(f"        if {s!r} not in p or {var[f]} {ops} p[{s!r}]:")
                started.append(f"            p[{s!r}] = {var[f]}")
        for prefix, f in self.hists:
            started.append(f"        h = {prefix!r} + bucket_of({var[f]})")
            started.append("        p[h] = p.get(h, 0.0) + 1.0")
        for s, f in self.lasts:
            started.append(f"        old = p.get({s!r})")
            started.append("        if old is None or ts >= old[0]:")
            started.append(f"            p[{s!r}] = (ts, event[{f!r}])")
        for i, (s, _) in enumerate(self.distincts):
            started.append(f"        sketch = p.get({s!r})")
            started.append("        if sketch is None:")
            started.append(f"            p[{s!r}] = {{d{i}}}")
            started.append("        else:")
            started.append(f"            sketch.add(d{i})")
            started.append(
                "            if len(sketch) > TRIM:  # trimmed now and then; pack and merge keep K"
            )
            started.append(f"                p[{s!r}] = kmv(sketch)")
        # the lasts are read in the order the loop version read them: a missing field fails the same way
        source = "\n".join(
            [
                "def fold(p, event, ts):",
                *reads,
                *hashes,
                "    if not p:",
                f"        p.update({{{', '.join(literal)}}})",
                "    else:",
                *started,
            ]
        )
        scope: dict[str, Any] = {
            "value_hash": value_hash,
            "bucket_of": bucket_of,
            "kmv": kmv,
            "TRIM": 2 * DISTINCT_K,
        }
        exec(compile(source, f"<fold of {self.__class__.__name__}>", "exec"), scope)
        fold: Callable[[Partial, Mapping[str, Any], int], None] = scope["fold"]
        return fold


def merge_slot(name: str, a: Any, b: Any) -> Any:
    if name.startswith("min:"):
        return min(a, b)
    if name.startswith("max:"):
        return max(a, b)
    if name.startswith("last:"):
        return b if b[0] >= a[0] else a
    if name.startswith("d:"):
        return kmv(a | b)
    return a + b


def merge(partials: Iterable[Mapping[str, Any]]) -> Partial:
    out: Partial = {}
    for p in partials:
        for k, v in p.items():
            out[k] = merge_slot(k, out[k], v) if k in out else v
    return out


def quantile(histogram: Mapping[str, float], q: float) -> float | None:
    """The q-quantile of a bucket histogram (lower quantile: the bucket of the ceil(q*n)-th value)."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = max(math.ceil(q * total), 1)
    seen = 0.0
    for bucket in sorted(histogram, key=lambda b: -math.inf if b == ZERO_BUCKET else int(b)):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_value(bucket)
    return None  # unreachable


def values(
    view: FeatureView, merged: Mapping[str, Any], distinct: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Feature values of a merged partial; ``distinct`` (field -> count) overrides the sketches' counts."""
    n = float(merged.get("n", 0.0))
    out: dict[str, Any] = {}
    for agg in view.aggregations:
        f = agg.field
        if agg.kind == "count":
            out[agg.name] = int(n)  # counts are integers on the wire
        elif n == 0:
            out[agg.name] = agg.default
        elif agg.kind == "sum":
            out[agg.name] = float(merged.get("s:" + str(f), 0.0))
        elif agg.kind == "mean":
            out[agg.name] = float(merged.get("s:" + str(f), 0.0)) / n
        elif agg.kind == "stddev":
            mean = float(merged.get("s:" + str(f), 0.0)) / n
            var = float(merged.get("q:" + str(f), 0.0)) / n - mean * mean
            out[agg.name] = math.sqrt(max(var, 0.0))  # population standard deviation
        elif agg.kind in ("min", "max"):
            out[agg.name] = merged.get(f"{agg.kind}:{f}", agg.default)
        elif agg.kind == "last":
            last = merged.get("last:" + str(f))
            out[agg.name] = agg.default if last is None else last[1]
        elif agg.kind == "distinct":
            if distinct is not None:
                out[agg.name] = int(distinct.get(str(f), 0))
            else:
                out[agg.name] = round(distinct_estimate(merged.get("d:" + str(f), ())))
        elif agg.kind == "quantile":
            prefix = f"h:{f}:"
            hist = {k[len(prefix) :]: float(v) for k, v in merged.items() if k.startswith(prefix)}
            result = quantile(hist, float(agg.q or 0.5))
            out[agg.name] = agg.default if result is None else result
    return out
