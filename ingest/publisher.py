"""Publishing to Kafka with bounded memory and an honest answer for every event.

``Publisher.publish`` returns only after Kafka acknowledged every record of a request
(acks=all, idempotent producer) or raises ``Unavailable``, which the HTTP layer turns
into a 503 with Retry-After. Nothing is dropped silently and nothing queues without
bound:

* A byte budget covers every record from the moment a request hands it over until
  its delivery future settles. The accumulator holds the bytes exactly that long, so
  the budget bounds the producer's memory. While it is exhausted, new requests are
  refused at once.
* The wait for acks is limited by ``publish_timeout_s``. The delivery futures are
  shielded from that timeout. Cancelling them would not stop delivery (the record is
  already in a batch), but it would free the budget early. An idempotent producer
  retries without end while Kafka is down, so that would let memory grow without
  limit. A record whose request timed out may still be delivered later; the client
  retries with the same ``event_id`` and downstream de-duplicates on it.

* Timeouts: every request waits at most ``publish_timeout_s``, so deadlines arrive in
  order and one sweeper timer serves them all (see ``_sweep``).

If Kafka is unreachable at start, the app still comes up (liveness is fine;
``/readyz`` says 503). Publishing then refuses with 503, and the producer keeps
reconnecting in the background. On shutdown the producer flushes for at most
``shutdown_timeout_s``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from pipeline.settings import CollectorSettings, KafkaSettings

from .logs import Throttle
from .metrics import CollectorMetrics

log = logging.getLogger("ingest.publisher")

# Charged per record on top of key+value: batch framing, the future, callbacks. Keeps
# the byte budget honest for tiny events (a budget only in payload bytes would admit
# far more small records than their real memory cost allows).
RECORD_OVERHEAD_BYTES = 256
STARTUP_ATTEMPT_TIMEOUT_S = 10.0
RECONNECT_BACKOFF_S = (0.5, 10.0)  # first, max (doubling)
PRODUCER_BATCH_BYTES = 256 * 1024
# A shared readiness probe older than this is cancelled, so one stuck metadata request
# cannot pin /readyz at 503 after Kafka is back.
PROBE_MAX_S = 5.0
# Publish deadlines are checked at most this often (a timeout may fire this much late).
SWEEP_INTERVAL_S = 0.05


class _Wait:
    """One request's publish deadline (see ``Publisher._sweep``)."""

    __slots__ = ("deadline", "task", "outer", "active", "expired")

    def __init__(self, deadline: float, task: asyncio.Task | None) -> None:
        self.deadline = deadline
        self.task = task
        self.outer: asyncio.Future | None = None  # set while waiting for acks
        self.active = True
        self.expired = False


class Unavailable(Exception):
    """The events of a request were not (all) acknowledged; answer 503 + Retry-After.

    ``reason``: kafka_not_ready | backpressure | publish_timeout | kafka_error | shutting_down
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TooLarge(Exception):
    """A single record exceeds the producer's max request size (client-caused: 413)."""


def crc32_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """Key -> partition, stable across processes and restarts.

    aiokafka's default (Java-compatible murmur2) is pure Python, about 17 us per key:
    a large share of the per-event cost. Only collectors write this topic, so any
    stable hash keeps a visitor's events on one partition; zlib.crc32 is C-fast.
    Partition ids of a Kafka topic are always 0..n-1.
    """
    if key is None:
        return available[0] if available else all_partitions[0]
    return zlib.crc32(key) % len(all_partitions)


ProducerFactory = Callable[[], Any]


def producer_options(collector: CollectorSettings, kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments of the collector's ``AIOKafkaProducer`` (tests reuse them)."""
    return {
        "bootstrap_servers": kafka.bootstrap,
        "client_id": f"collector-{socket.gethostname()}",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": collector.linger_ms,
        # send() blocks while its partition's batch is full and not yet drained; a larger
        # batch absorbs bursts while a produce request is in flight.
        "max_batch_size": PRODUCER_BATCH_BYTES,
        "partitioner": crc32_partitioner,
    }


class Publisher:
    def __init__(
        self,
        collector: CollectorSettings,
        kafka: KafkaSettings,
        metrics: CollectorMetrics,
        producer_factory: ProducerFactory | None = None,
    ) -> None:
        self._topic = kafka.events_topic
        self._bootstrap = kafka.bootstrap
        self.producer_options = producer_options(collector, kafka)
        self._max_inflight = collector.max_inflight_bytes
        self._timeout = collector.publish_timeout_s
        self._flush_timeout = collector.shutdown_timeout_s
        self._factory = producer_factory or self._default_producer
        self._metrics = metrics
        self._throttle = Throttle(log)
        self.producer: Any = None
        self.inflight_bytes = 0
        self.inflight_events = 0
        self._stopping = False
        self._connect_task: asyncio.Task | None = None
        self._probe: asyncio.Future | None = None
        # Every request waits at most publish_timeout_s, so deadlines arrive in order:
        # a FIFO plus one timer replaces a timer per request (asyncio.timeout costs ~6 us
        # and grows the loop's timer heap under load).
        self._waits: collections.deque[_Wait] = collections.deque()
        self._sweep_handle: asyncio.TimerHandle | None = None
        metrics.bind_state(
            lambda: self.inflight_bytes, lambda: self.inflight_events, lambda: 1 if self.producer else 0
        )

    def _default_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(**self.producer_options)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Try once to connect (bounded); on failure keep trying in the background."""
        if not await self._attempt():
            self._connect_task = asyncio.create_task(self._reconnect_loop(), name="kafka-connect")

    async def _attempt(self, attempt: int = 1) -> bool:
        producer = self._factory()
        try:
            async with asyncio.timeout(STARTUP_ATTEMPT_TIMEOUT_S):
                await producer.start()
        except Exception as exc:  # noqa: BLE001 - any failure means "not connected yet"
            await _quiet_stop(producer)
            log.warning(
                "collector.kafka_unavailable",
                extra={"bootstrap": self._bootstrap, "attempt": attempt, "error": repr(exc)},
            )
            return False
        if self._stopping:
            await _quiet_stop(producer)
            return True
        self.producer = producer
        log.info(
            "collector.kafka_connected",
            extra={"bootstrap": self._bootstrap, "topic": self._topic, "after_attempts": attempt},
        )
        return True

    async def _reconnect_loop(self) -> None:
        delay, cap = RECONNECT_BACKOFF_S
        attempt = 1
        while not self._stopping:
            await asyncio.sleep(delay)
            attempt += 1
            if await self._attempt(attempt=attempt):
                return
            delay = min(delay * 2, cap)

    def begin_shutdown(self) -> None:
        """Stop being ready (load balancers drain us); in-flight requests still complete."""
        self._stopping = True

    async def stop(self) -> None:
        """Flush everything accepted so far and close the producer."""
        self._stopping = True
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
        producer, self.producer = self.producer, None
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if producer is None:
            return
        pending = self.inflight_events
        try:
            # stop() flushes first; an idempotent producer retries for ever while Kafka
            # is down, so bound it or SIGTERM would never finish.
            async with asyncio.timeout(self._flush_timeout):
                await producer.stop()
        except TimeoutError:
            # No client got a 2xx for these (their requests timed out or were cut off).
            log.error(
                "collector.kafka_flush_timeout",
                extra={"unflushed_events": self.inflight_events, "timeout_s": self._flush_timeout},
            )
            await _quiet_close(producer)
            return
        log.info("collector.kafka_flushed", extra={"flushed_events": pending})

    # ------------------------------------------------------------------ readiness

    async def kafka_reachable(self, timeout_s: float = 1.0) -> bool:
        """True if the producer is running and a broker answers a metadata request now.

        Concurrent probes share one metadata request. A probe's own timeout does not
        cancel it (shield); it lives at most PROBE_MAX_S. That avoids interrupting
        aiokafka's connection setup from every impatient probe.
        """
        producer = self.producer
        if producer is None or self._stopping:
            return False
        # aiokafka internals, read defensively: if its send loop died (a fatal error),
        # the producer accepts records it can never deliver.
        sender = getattr(producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is not None and task.done():
            return False
        probe = self._probe
        if probe is None or probe.done():
            probe = self._probe = asyncio.ensure_future(
                asyncio.wait_for(producer.client.fetch_all_metadata(), PROBE_MAX_S)
            )
            probe.add_done_callback(_consume_exception)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(probe)
        except Exception:  # noqa: BLE001 - any failure is "not reachable"
            return False
        return True

    # ------------------------------------------------------------------ publishing

    def _settled(self, cost: int, fut: asyncio.Future) -> None:
        self.inflight_bytes -= cost
        self.inflight_events -= 1
        if not fut.cancelled() and fut.exception() is not None:  # also marks it retrieved
            self._throttle.log(
                logging.WARNING, "delivery", "collector.delivery_failed", error=repr(fut.exception())
            )

    async def publish(self, records: Sequence[tuple[bytes, bytes]], timestamp_ms: int) -> None:
        """Send (key, value) records; return once Kafka acknowledged all of them.

        Raises ``Unavailable`` (503) or ``TooLarge`` (413).
        """
        producer = self.producer
        if producer is None:
            raise Unavailable("shutting_down" if self._stopping else "kafka_not_ready")
        n = len(records)
        cost = RECORD_OVERHEAD_BYTES * n
        for key, value in records:
            cost += len(key) + len(value)
        # An idle publisher takes any single request, so a budget smaller than one
        # request cannot block all traffic; memory stays within budget + one request.
        if self.inflight_bytes and self.inflight_bytes + cost > self._max_inflight:
            raise Unavailable("backpressure")
        self.inflight_bytes += cost
        self.inflight_events += n
        unowned_cost, unowned_events = cost, n  # released below unless a future owns them
        send, topic, settled = producer.send, self._topic, self._settled
        loop = asyncio.get_running_loop()
        started = loop.time()
        wait = _Wait(started + self._timeout, asyncio.current_task())
        self._waits.append(wait)
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_at(max(wait.deadline, started + SWEEP_INTERVAL_S), self._sweep)
        try:
            futures: list[asyncio.Future] = []
            for key, value in records:
                # Usually returns at once; it waits only for topic metadata or buffer
                # space. A timeout there cancels send() itself, so that record is never sent.
                fut = await send(topic, value, key, timestamp_ms=timestamp_ms)
                record_cost = len(key) + len(value) + RECORD_OVERHEAD_BYTES
                unowned_cost -= record_cost
                unowned_events -= 1
                fut.add_done_callback(partial(settled, record_cost))
                futures.append(fut)
            if n == 1:
                acks = futures[0]
            else:
                acks = asyncio.gather(*futures)
                acks.add_done_callback(_consume_exception)
            # The timeout cancels only this shield, never the delivery futures: they
            # keep their bytes budgeted until Kafka settles them.
            wait.outer = asyncio.shield(acks)
            await wait.outer
        except asyncio.CancelledError:
            if not wait.expired:
                raise
            if wait.outer is None:  # expired during send(): we cancelled the task
                asyncio.current_task().uncancel()
            raise Unavailable("publish_timeout", f"no ack within {self._timeout}s") from None
        except MessageSizeTooLargeError as exc:
            raise TooLarge(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - whatever the producer raises, the answer is 503
            raise Unavailable("kafka_error", repr(exc)) from None
        finally:
            wait.active = False
            wait.task = wait.outer = None
            waits = self._waits
            while waits and not waits[0].active:  # acks mostly come in order: O(1) amortised
                waits.popleft()
            if unowned_events:
                self.inflight_bytes -= unowned_cost
                self.inflight_events -= unowned_events
        self._metrics.publish_latency.observe(loop.time() - started)

    def _sweep(self) -> None:
        """Expire overdue publishes: cancel the ack wait (shield), or the task while it
        is still inside send()."""
        self._sweep_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        waits = self._waits
        while waits:
            wait = waits[0]
            if wait.active:
                if wait.deadline > now:
                    break
                wait.active = False
                wait.expired = True
                if wait.outer is not None:
                    wait.outer.cancel()
                elif wait.task is not None:
                    wait.task.cancel()
            waits.popleft()
        if waits:
            self._sweep_handle = loop.call_at(max(waits[0].deadline, now + SWEEP_INTERVAL_S), self._sweep)

    def refused(self, exc: Unavailable, n: int) -> None:
        """Account for (and rate-limit the logging of) events refused with a 503."""
        self._metrics.reject(exc.reason, n)
        self._throttle.log(
            logging.WARNING,
            exc.reason,
            "collector.refusing",
            reason=exc.reason,
            detail=exc.detail,
            inflight_bytes=self.inflight_bytes,
            inflight_events=self.inflight_events,
        )


def _consume_exception(fut: asyncio.Future) -> None:
    # Keeps "exception was never retrieved" noise out of the logs; failures are
    # reported through the request that waited (or the throttled delivery warning).
    if not fut.cancelled():
        fut.exception()


async def _quiet_close(producer: Any) -> None:
    # After an abandoned stop(): drop the connections (the sender task is cancelled
    # with the loop's remaining tasks).
    try:
        async with asyncio.timeout(1.0):
            await producer.client.close()
    except Exception:  # noqa: BLE001 - best effort on the way out
        log.debug("collector.kafka_close_failed", exc_info=True)


async def _quiet_stop(producer: Any) -> None:
    try:
        await producer.stop()
    except Exception:  # noqa: BLE001 - best-effort cleanup of a producer that never ran
        log.debug("collector.producer_stop_failed", exc_info=True)
