"""What the drift scorer remembers between records, and its snapshot for exactly-once restarts.

Per model: the live windows of its monitored inputs (shared by its versions: an input is an input
whichever version scored it), the output window of each version recently served, and per (version,
watched name) the alarm state — armed, or waiting for ``cooldown_checks`` calm checks in a row before it
re-arms. Windows hold the raw served values (numbers, strings, booleans, None), so a version whose
reference types an input differently still reads them.

Output windows are kept for the :data:`OUTPUT_WINDOWS` versions served most recently (a version served
again starts its output window afresh); alarm states are never evicted while their version's reference is
kept, so an alert is never raised twice for one episode. :meth:`DriftState.snapshot` serialises all of it
(JSON), :meth:`DriftState.restore` takes it back.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

OUTPUT_WINDOWS = 4  # output windows kept per model, most recently served versions
SNAPSHOT_FORMAT = 1


@dataclass
class Alarm:
    """The alarm state of one (version, watched name): armed, or calm checks seen since it fired."""

    armed: bool = True
    calm: int = 0

    def step(self, fired: bool, calm: bool, cooldown: int) -> bool:
        """Take one check; True when it raises an alert (armed and fired). A disarmed alarm re-arms after
        ``max(1, cooldown)`` calm checks in a row (hysteresis and cool-down)."""
        if self.armed:
            if fired:
                self.armed, self.calm = False, 0
                return True
            return False
        self.calm = self.calm + 1 if calm else 0
        if self.calm >= max(1, cooldown):
            self.armed, self.calm = True, 0
        return False


@dataclass
class ModelWindows:
    """One model's windows and alarms (module docstring)."""

    window: int
    inputs: dict[str, deque[Any]] = field(default_factory=dict)
    outputs: dict[int, deque[Any]] = field(default_factory=dict)  # by version, least recently served first
    alarms: dict[tuple[int, str], Alarm] = field(default_factory=dict)
    seen: int = 0  # predictions compared with their version's reference
    checks: int = 0

    def push_inputs(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            win = self.inputs.get(name)
            if win is None:
                win = self.inputs[name] = deque(maxlen=self.window)
            win.append(value)

    def push_output(self, version: int, value: Any) -> None:
        win = self.outputs.pop(version, None)
        if win is None:
            win = deque(maxlen=self.window)
        self.outputs[version] = win  # now the most recently served
        win.append(value)
        while len(self.outputs) > OUTPUT_WINDOWS:
            del self.outputs[next(iter(self.outputs))]

    def alarm(self, version: int, name: str) -> Alarm:
        found = self.alarms.get((version, name))
        if found is None:
            found = self.alarms[version, name] = Alarm()
        return found

    def forget(self, version: int) -> None:
        """Drop what is kept of ``version`` (its reference is no longer kept)."""
        self.outputs.pop(version, None)
        for key in [k for k in self.alarms if k[0] == version]:
            del self.alarms[key]

    def keep_inputs(self, names: set[str]) -> None:
        for name in set(self.inputs) - names:
            del self.inputs[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": {n: list(w) for n, w in self.inputs.items()},
            "outputs": [[v, list(w)] for v, w in self.outputs.items()],
            "alarms": [[v, n, a.armed, a.calm] for (v, n), a in self.alarms.items()],
            "seen": self.seen,
            "checks": self.checks,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], window: int) -> ModelWindows:
        mw = cls(window, seen=int(d["seen"]), checks=int(d["checks"]))
        mw.inputs = {n: deque(vals, maxlen=window) for n, vals in d["inputs"].items()}
        mw.outputs = {int(v): deque(vals, maxlen=window) for v, vals in d["outputs"]}
        mw.alarms = {(int(v), str(n)): Alarm(bool(armed), int(calm)) for v, n, armed, calm in d["alarms"]}
        return mw


class DriftState:
    """Every watched model's :class:`ModelWindows`."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.models: dict[str, ModelWindows] = {}

    def of(self, model: str) -> ModelWindows:
        found = self.models.get(model)
        if found is None:
            found = self.models[model] = ModelWindows(self.window)
        return found

    def snapshot(self) -> bytes:
        body = {"format": SNAPSHOT_FORMAT, "window": self.window}
        body["models"] = {m: w.to_json() for m, w in self.models.items()}  # type: ignore[assignment]
        return json.dumps(body, separators=(",", ":")).encode()

    def restore(self, data: bytes) -> None:
        """Take a :meth:`snapshot`'s state. Windows taken with another window size are resized (their
        newest values kept)."""
        body = json.loads(data)
        if body.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"drift state snapshot format {body.get('format')!r} is not {SNAPSHOT_FORMAT}")
        self.models = {m: ModelWindows.from_json(d, self.window) for m, d in body["models"].items()}
