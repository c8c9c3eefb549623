"""Packed partials: one tile's partial aggregate as the text of one hash field (see :mod:`features.store`).

``slot=value`` lines (slot names of :mod:`features.aggregations`): numbers as integers when exact, else
``repr``; ``last:F`` as ``"{event time} {JSON value}"``; ``d:F`` as a sorted JSON array of at most
``DISTINCT_K`` value hashes. :func:`packer` gives a view's packing as generated code (its hot path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from features import aggregations
from schemas.definitions import FeatureView


def pack(partial: Mapping[str, Any]) -> str:
    """One tile's partial as one hash field value.

    Numeric slots hold floats, ``last:`` slots (time, value) tuples, ``d:`` slots sets (written as a
    sorted JSON array).
    """
    lines = []
    for slot, value in partial.items():
        kind = type(value)
        if kind is not float:
            if kind is tuple:
                lines.append(f"{slot}={value[0]} {orjson.dumps(value[1]).decode()}")
                continue
            if kind is set:
                if len(value) == 1:
                    lines.append(f"{slot}=[{next(iter(value))}]")
                else:
                    lines.append(f"{slot}={orjson.dumps(sorted(value)[: aggregations.DISTINCT_K]).decode()}")
                continue
            value = float(value)
        # integers without a fraction (counts stay short and exact), else repr
        if value.is_integer() and -_EXACT < value < _EXACT:
            lines.append(f"{slot}={int(value)}")
        else:
            lines.append(f"{slot}={value!r}")
    return "\n".join(lines)


_PACKERS: dict[tuple[Any, ...], Callable[[Mapping[str, Any]], str]] = {}


def packer(view: FeatureView) -> Callable[[Mapping[str, Any]], str]:
    """:func:`pack` for the partials of ``view``'s fold, as generated code: the slots are known, so the
    text is one f-string (any other partial, a histogram's for one, goes to :func:`pack`)."""
    folder = aggregations.Folder(view)
    if folder.hists:
        return pack
    numeric = ["n"] + [slot for slot, _ in folder.sums + folder.squares + folder.mins + folder.maxs]
    lasts = [slot for slot, _ in folder.lasts]
    distincts = [slot for slot, _ in folder.distincts]
    spec = (tuple(numeric), tuple(lasts), tuple(distincts))
    found = _PACKERS.get(spec)
    if found is not None:
        return found
    lines = [
        "def pack_known(p):",
        f"    if len(p) != {len(numeric) + len(lasts) + len(distincts)}:",
        "        return pack(p)",
        "    try:",
    ]
    parts = []
    for i, slot in enumerate(numeric):
        lines.append(f"        x{i} = p[{slot!r}]")
        lines.append(f"        x{i} = int(x{i}) if x{i}.is_integer() and -EXACT < x{i} < EXACT else x{i}")
        parts.append(f"{slot}={{x{i}!r}}")
    for i, slot in enumerate(lasts):
        lines.append(f"        l{i} = p[{slot!r}]")
        parts.append(f"{slot}={{l{i}[0]}} {{dumps(l{i}[1]).decode()}}")
    for i, slot in enumerate(distincts):
        lines.append(f"        d{i} = p[{slot!r}]")
        one, many = f"f'[{{next(iter(d{i}))}}]'", f"dumps(sorted(d{i})[:K]).decode()"
        lines.append(f"        d{i} = {one} if len(d{i}) == 1 else {many}")
        parts.append(f"{slot}={{d{i}}}")
    lines += [
        "    except (KeyError, AttributeError, TypeError):",
        "        return pack(p)",
        f"    return f{chr(10).join(parts)!r}",
    ]
    scope: dict[str, Any] = {
        "pack": pack,
        "EXACT": _EXACT,
        "dumps": orjson.dumps,
        "K": aggregations.DISTINCT_K,
    }
    exec(compile("\n".join(lines), "<pack of a view>", "exec"), scope)
    found = _PACKERS[spec] = scope["pack_known"]
    return found


def unpack(packed: bytes | str) -> dict[str, Any]:
    """The partial of a packed field (the inverse of :func:`pack`, after any number of merges)."""
    text = packed.decode() if isinstance(packed, bytes) else packed
    out: dict[str, Any] = {}
    for line in text.split("\n"):
        slot, _, value = line.partition("=")
        if slot.startswith("last:"):
            ts, _, raw = value.partition(" ")
            out[slot] = (int(float(ts)), orjson.loads(raw))
        elif slot.startswith("d:"):
            out[slot] = set(orjson.loads(value))
        else:
            out[slot] = float(value)
    return out


_EXACT = float(2**53)
