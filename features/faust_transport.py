"""faust's aiokafka transport with a configurable fetch wait.

faust fixes ``fetch_max_wait_ms`` at 1500 ms. A broker answers a fetch as soon as data is there on
Apache Kafka, but one that holds fetches for the whole wait (the embedded broker does) would add up to
that much to every event's freshness. The wait is the upper bound on how long an idle partition's fetch
may block, so a small value only costs a few more empty fetches.
"""

from __future__ import annotations

from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    fetch_max_wait_ms: int = 1500

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms  # read when its fetcher starts
        return consumer


def app_class(fetch_max_wait_ms: int) -> type[faust.App]:
    """A faust App class whose consumers use ``fetch_max_wait_ms``."""

    class ConsumerThread(_ConsumerThread):
        pass

    ConsumerThread.fetch_max_wait_ms = fetch_max_wait_ms

    class TideConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        Consumer = TideConsumer

    class App(faust.App):
        def _new_transport(self) -> Any:
            return Transport(self.conf.broker_consumer, self)

    return App
