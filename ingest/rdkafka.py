"""An asyncio face for librdkafka's producer (confluent-kafka), for the collector.

Why librdkafka here: the collector is CPU-bound on one Python thread, and a pure-Python
client spends ~20 us of that thread per record on batching, protocol encoding, CRCs
and socket I/O. librdkafka does all of that in its own C threads; what is left on the
event loop is one ``produce()`` call per record and its delivery report.

Delivery reports are served by ``poll()``, on the event loop's thread: every
``POLL_INTERVAL_S`` while records are in flight (a non-blocking ``poll(0)`` costs about
a microsecond and serves every report that arrived meanwhile), every
``IDLE_POLL_INTERVAL_S`` otherwise (for error and log callbacks). A thread blocked in
``poll()`` would hand reports over sooner, but each hand-over takes the GIL from the
loop: measured, that cost more than the millisecond of latency it saves.

The default partitioner ``consistent_random`` is CRC-32 (the zlib polynomial) of the
key modulo the partition count: the same mapping the collector used before, so a
visitor's events stay on their partition across a rolling upgrade.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

log = logging.getLogger("ingest.rdkafka")

POLL_INTERVAL_S = 0.001
IDLE_POLL_INTERVAL_S = 1.0
FLUSH_STEP_S = 0.01


class DeliveryFailed(Exception):
    """Kafka did not take a record (librdkafka gave up, or the broker refused it)."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(error.str())
        self.error = error

    @property
    def too_large(self) -> bool:
        return self.error.code() == KafkaError.MSG_SIZE_TOO_LARGE


class RdKafkaProducer:
    """librdkafka's producer with delivery reports delivered on the event loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self._producer: confluent_kafka.Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll_handle: asyncio.TimerHandle | None = None
        self._fast = False  # polling every POLL_INTERVAL_S (records in flight)
        # A fatal error (e.g. the idempotent producer's sequence got out of step) makes the
        # producer unusable; readiness reports it and publishing refuses.
        self.fatal: KafkaError | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, timeout_s: float) -> None:
        """Create the producer and wait until a broker answers a metadata request."""
        self.open()
        await self.metadata(timeout_s)

    def open(self) -> None:
        """Create the producer and start serving its reports (no broker contacted yet)."""
        self._loop = asyncio.get_running_loop()
        self._producer = confluent_kafka.Producer({**self.config, "error_cb": self._on_error, "logger": log})
        self._poll_handle = self._loop.call_later(IDLE_POLL_INTERVAL_S, self._poll)

    async def metadata(self, timeout_s: float) -> Any:
        """Cluster metadata from a broker (raises KafkaException when none answers).
        In a worker thread: list_topics() blocks, and serves no delivery reports."""
        producer = self._producer
        if producer is None:
            raise KafkaException(KafkaError(KafkaError._STATE, "producer not started"))
        return await asyncio.get_running_loop().run_in_executor(
            None, partial(producer.list_topics, timeout=timeout_s))

    async def stop(self, timeout_s: float | None = None) -> int:
        """Flush (at most ``timeout_s``) and close; returns records left unflushed.

        Flushes in steps on the loop's thread, so delivery reports run where their
        callbacks expect to run."""
        producer = self._producer
        if producer is None:
            return 0
        if self._poll_handle is not None:
            self._poll_handle.cancel()
            self._poll_handle = None
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        left = producer.flush(0)
        while left and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(FLUSH_STEP_S)
            left = producer.flush(0)
        if left:
            # Whatever is still queued would keep retrying in a dead process: fail it now,
            # so every record gets its report (and its bytes leave the budget).
            producer.purge()
            for _ in range(100):
                if not producer.flush(0):
                    break
                await asyncio.sleep(FLUSH_STEP_S)
        self._producer = None
        await loop.run_in_executor(None, producer.close)
        return left

    @property
    def running(self) -> bool:
        return self._producer is not None

    def __len__(self) -> int:
        return len(self._producer) if self._producer is not None else 0

    # ------------------------------------------------------------------ producing

    def send(self, topic: str, value: bytes, key: bytes | None, timestamp_ms: int,
             on_delivery: Callable[[KafkaError | None, Any], None]) -> None:
        """Hand one record to librdkafka; never blocks. ``on_delivery(err, msg)``, its
        delivery report, is called later on the event loop's thread, with err None once
        Kafka acknowledged the record (``DeliveryFailed(err)`` says why it was not;
        passed through unwrapped: a wrapper costs a Python call per record).
        Raises BufferError when librdkafka's queue is full and KafkaException for a
        record it refuses outright (then ``on_delivery`` is never called)."""
        self._producer.produce(topic, value, key, timestamp=timestamp_ms, on_delivery=on_delivery)
        if not self._fast:
            self._fast = True
            if self._poll_handle is not None:
                self._poll_handle.cancel()
            self._poll_handle = self._loop.call_later(POLL_INTERVAL_S, self._poll)

    # ------------------------------------------------------------------ reports

    def poll(self) -> None:
        """Serve the delivery reports that arrived (non-blocking, ~1 us when none did).
        Busy callers call it as they go, which cuts the wait for the next timer."""
        try:
            self._producer.poll(0)
        except Exception:  # noqa: BLE001 - a failing callback must not end delivery reports
            log.exception("collector.rdkafka_poll_failed")

    def _poll(self) -> None:
        producer = self._producer
        if producer is None:
            return
        self.poll()
        # Fast while anything is queued or awaiting its ack.
        self._fast = len(producer) > 0
        self._poll_handle = self._loop.call_later(POLL_INTERVAL_S if self._fast else IDLE_POLL_INTERVAL_S, self._poll)

    def _on_error(self, err: KafkaError) -> None:
        # Transport errors (all brokers down, ...) are retried by librdkafka itself; only
        # fatal ones end this producer.
        if err.fatal():
            self.fatal = err
            log.error("collector.kafka_fatal", extra={"error": err.str()})
        else:
            log.debug("collector.kafka_error", extra={"error": err.str()})
