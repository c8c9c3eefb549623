"""Which drift alerts trigger a retraining, and which were already acted on.

A ``drift_alert`` (topic ``drift-alerts``) of kind ``input`` or ``output`` is a *drift* alert, one of kind
``concept`` a *concept* alert; a model's :class:`schemas.policy.Retrain` policy lists the ones it reacts
to in ``on``. Per model, at most one triggered version per ``min_interval_s`` (a later alert inside the
interval is logged and dropped), and an alert is acted on once: the version it triggered names it in its
``trigger`` (``"<kind> drift alert <alert_id>"``), so a reader of the models topic knows every alert
already acted on and when the last triggered version was made, whatever restarted in between.

Both trainers use :class:`Triggers`: the online trainer (a refresh) and the batch retrainer (a retrain).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.kafka import make_consumer
from infra.settings import CommonSettings
from infra.topics import topic
from models.versions import read_versions
from online_training.blessing import Champions
from schemas import codec
from schemas.definitions import Model

log = logging.getLogger(__name__)

SCHEDULE = "schedule"
_ALERT = re.compile(r"^(\w+) drift alert (\S+)$")


def category(kind: str) -> str:
    """The policy's name for an alert kind: ``concept``, else ``drift`` (input and output)."""
    return "concept" if kind == "concept" else "drift"


def trigger_of(alert: Mapping[str, Any]) -> str:
    """The ``trigger`` a version made for ``alert`` records."""
    return f"{alert.get('kind') or 'input'} drift alert {alert['alert_id']}"


def alert_of(trigger: str | None) -> str | None:
    """The alert id a version's ``trigger`` names, or None."""
    found = _ALERT.match(trigger or "")
    return found.group(2) if found else None


@dataclass
class Triggers:
    """Alerts acted on and when each model was last retrained on one (module docstring)."""

    acted: set[str] = field(default_factory=set)  # alert ids
    last_ms: dict[str, int] = field(default_factory=dict)  # model -> created_ts of its newest triggered

    def seen(self, record: Mapping[str, Any]) -> None:
        """Note a ``model_version`` record (a triggered one names its alert)."""
        alert = alert_of(record.get("trigger"))
        if alert is not None:
            self.acted.add(alert)
            name = str(record["model"])
            self.last_ms[name] = max(self.last_ms.get(name, 0), int(record.get("created_ts") or 0))

    def wanted(self, model: Model, alert: Mapping[str, Any], now_ms: int) -> bool:
        """Whether ``alert`` should trigger a retraining of ``model`` now (logs why not)."""
        policy = model.policy.retrain
        kind = str(alert.get("kind") or "input")
        alert_id = str(alert["alert_id"])
        if alert_id in self.acted:
            log.info("model %s: %s drift alert %s already acted on", model.name, kind, alert_id)
            return False
        if category(kind) not in policy.on:
            log.info(
                "model %s: %s drift alert %s ignored: its retrain policy reacts to %s",
                model.name,
                kind,
                alert_id,
                ", ".join(policy.on) or "no alert",
            )
            return False
        last = self.last_ms.get(model.name)
        if last is not None and now_ms - last < policy.min_interval_s * 1000:
            log.info(
                "model %s: %s drift alert %s ignored: retrained on an alert %.0f s ago (min_interval_s %s)",
                model.name,
                kind,
                alert_id,
                (now_ms - last) / 1000,
                policy.min_interval_s,
            )
            return False
        return True

    def acting(self, model: str, alert: Mapping[str, Any], now_ms: int) -> None:
        """Note that ``alert`` triggers a version of ``model`` now."""
        self.acted.add(str(alert["alert_id"]))
        self.last_ms[model] = now_ms


@dataclass
class Known:
    """What the models topic says, read in one pass: each model's newest version (any flavor), its
    champion (newest blessed) and the drift alerts already acted on."""

    newest: dict[str, dict[str, Any]] = field(default_factory=dict)
    champions: Champions = field(default_factory=Champions)
    triggers: Triggers = field(default_factory=Triggers)

    @classmethod
    def read(cls, settings: CommonSettings) -> Known:
        known = cls()
        for record in read_versions(settings):
            known.seen(record)
        return known

    def seen(self, record: Mapping[str, Any]) -> None:
        name = str(record["model"])
        if name not in self.newest or record["version"] > self.newest[name]["version"]:
            self.newest[name] = dict(record)
        self.champions.seen(record)
        self.triggers.seen(record)


class AlertReader:
    """The batch retrainer's reader of the ``drift-alerts`` topic (its own consumer group; offsets
    committed once the retrainings they triggered are done: a restart re-reads the alerts of an
    unfinished cycle, and those already acted on are known from the models topic)."""

    def __init__(self, settings: CommonSettings, group: str) -> None:
        self.consumer = make_consumer(settings, group)
        self.consumer.subscribe([topic(settings, "drift-alerts")])
        self._read = False

    def poll(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for msg in self.consumer.consume(500, timeout=0.2):
            if msg.error() is not None:
                continue
            try:
                found.append(codec.decode(msg.value() or b"", "drift_alert"))
            except Exception as exc:
                log.warning("undecodable drift alert at offset %s: %s", msg.offset(), exc)
            self._read = True
        return found

    def commit(self) -> None:
        if self._read:
            self.consumer.commit(asynchronous=False)
            self._read = False

    def close(self) -> None:
        self.consumer.close()
