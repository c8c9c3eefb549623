"""The dead-letter record: the original key and value with headers naming the failure and the origin.

Plain data with no client imports, so every writer (the processors, the Flink job) sends the same
headers; :mod:`infra.deadletter` sends them to Kafka.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class DeadLetter:
    stage: str
    error: str
    error_type: str
    key: bytes | None
    value: bytes | None
    source_topic: str
    partition: int
    offset: int

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return [
            ("tide.stage", self.stage.encode()),
            ("tide.error", self.error[:2000].encode()),
            ("tide.error_type", self.error_type.encode()),
            ("tide.source.topic", self.source_topic.encode()),
            ("tide.source.partition", str(self.partition).encode()),
            ("tide.source.offset", str(self.offset).encode()),
            ("tide.ts", str(int(time.time() * 1000)).encode()),
        ]
