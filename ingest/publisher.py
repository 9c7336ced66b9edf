"""Publishing to Kafka with bounded memory and an honest answer for every event.

``Publisher.publish`` returns only after Kafka acknowledged every record of a request
(acks=all, idempotent producer) or raises ``Unavailable``, which the HTTP layer turns
into a 503 with Retry-After. Nothing is dropped silently and nothing queues without
bound:

* A byte budget covers every record from the moment librdkafka takes it until its
  delivery report arrives (which always happens: acked, failed, or purged on
  shutdown). librdkafka holds the bytes exactly that long, so the budget bounds the
  producer's memory. While it is exhausted, new requests are refused at once.
* The wait for acks is limited by ``publish_timeout_s``: at the deadline the request's
  future is cancelled, and it answers 503. Its records stay budgeted: they are still
  queued and retried (up to librdkafka's ``message.timeout.ms``), and releasing their
  bytes early would let memory grow without limit while Kafka is down. A record whose
  request timed out may still be delivered later; the client retries with the same
  ``event_id`` and downstream de-duplicates on it.
* Deadlines arrive in order (every request waits at most ``publish_timeout_s``), so
  one sweeper timer serves them all (see ``_sweep``).

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
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from pipeline.settings import CollectorSettings, KafkaSettings

from .logs import Throttle
from .metrics import CollectorMetrics
from .rdkafka import DeliveryFailed, RdKafkaProducer

log = logging.getLogger("ingest.publisher")

# Charged per record on top of key+value: batch framing, the future, callbacks. Keeps
# the byte budget honest for tiny events (a budget only in payload bytes would admit
# far more small records than their real memory cost allows).
RECORD_OVERHEAD_BYTES = 256
STARTUP_ATTEMPT_TIMEOUT_S = 10.0
RECONNECT_BACKOFF_S = (0.5, 10.0)  # first, max (doubling)
# A shared readiness probe older than this is cancelled, so one stuck metadata request
# cannot pin /readyz at 503 after Kafka is back.
PROBE_MAX_S = 5.0
# Publish deadlines are checked at most this often (a timeout may fire this much late).
SWEEP_INTERVAL_S = 0.05


class _Request:
    """One request's records in flight, and its publish deadline (see ``Publisher._sweep``)."""

    __slots__ = ("deadline", "future", "left", "timestamp_ms", "error", "unsent", "active", "expired")

    def __init__(self, deadline: float, future: asyncio.Future, left: int, timestamp_ms: int) -> None:
        self.deadline = deadline
        self.future = future  # what the request awaits: all acked, or the first failure
        self.left = left  # records without a delivery report yet
        self.timestamp_ms = timestamp_ms
        self.error: Exception | None = None
        self.unsent = False  # librdkafka refused one of its records: send no more of them
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


ProducerFactory = Callable[[], Any]


def producer_options(collector: CollectorSettings, kafka: KafkaSettings) -> dict[str, Any]:
    """librdkafka configuration of the collector's producer (tests reuse it)."""
    return {
        "bootstrap.servers": kafka.bootstrap,
        "client.id": f"collector-{socket.gethostname()}",
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": collector.linger_ms,
        # CRC-32 of the key: one visitor's events on one partition, as before (rdkafka.py).
        "partitioner": "consistent_random",
        # Our byte budget is the real limit; librdkafka's own queue (1 GiB by default)
        # is capped near it as a second guard, so a bug cannot queue without bound.
        "queue.buffering.max.kbytes": max(1024, 2 * collector.max_inflight_bytes // 1024),
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
        self._waits: collections.deque[_Request] = collections.deque()
        self._sweep_handle: asyncio.TimerHandle | None = None
        # Records waiting for the end of this loop iteration (see _drain).
        self._outbox: list[tuple[_Request, bytes, bytes, int]] = []
        self._drain_scheduled = False
        metrics.bind_state(
            lambda: self.inflight_bytes, lambda: self.inflight_events, lambda: 0 if self.producer is None else 1
        )

    def _default_producer(self) -> RdKafkaProducer:
        return RdKafkaProducer(self.producer_options)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Try once to connect (bounded); on failure keep trying in the background."""
        if not await self._attempt():
            self._connect_task = asyncio.create_task(self._reconnect_loop(), name="kafka-connect")

    async def _attempt(self, attempt: int = 1) -> bool:
        producer = self._factory()
        try:
            async with asyncio.timeout(STARTUP_ATTEMPT_TIMEOUT_S + 1):
                await producer.start(STARTUP_ATTEMPT_TIMEOUT_S)
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
        # The flush is bounded: the producer retries while Kafka is down, and SIGTERM
        # must finish.
        left = await producer.stop(self._flush_timeout)
        if left:
            # No client got a 2xx for these (their requests timed out or were cut off).
            log.error(
                "collector.kafka_flush_timeout",
                extra={"unflushed_events": left, "timeout_s": self._flush_timeout},
            )
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
        # After a fatal error (or if its poll thread died) the producer accepts records
        # it can never deliver.
        if producer.fatal is not None or not producer.running:
            return False
        probe = self._probe
        if probe is None or probe.done():
            # list_topics() has its own timeout; wait_for is the backstop for anything stuck.
            probe = self._probe = asyncio.ensure_future(
                asyncio.wait_for(producer.metadata(PROBE_MAX_S), PROBE_MAX_S + 1))
            probe.add_done_callback(_consume_exception)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(probe)
        except Exception:  # noqa: BLE001 - any failure is "not reachable"
            return False
        return True

    # ------------------------------------------------------------------ publishing

    def _delivered(self, request: _Request, cost: int, err: KafkaError | None, msg: Any) -> None:
        """One record's delivery report (on the loop thread): its bytes leave the budget
        now, whatever became of the request that sent it."""
        self._release(cost)
        if err is not None:
            error = DeliveryFailed(err)
            self._throttle.log(logging.WARNING, "delivery", "collector.delivery_failed", error=repr(error))
            if request.error is None:
                request.error = error
        request.left -= 1
        if request.left == 0 and not request.future.done():
            if request.error is None:
                request.future.set_result(None)
            else:
                request.future.set_exception(request.error)

    async def publish(self, records: Sequence[tuple[bytes, bytes]], timestamp_ms: int) -> None:
        """Send (key, value) records; return once Kafka acknowledged all of them.

        Raises ``Unavailable`` (503) or ``TooLarge`` (413).
        """
        producer = self.producer
        if producer is None:
            raise Unavailable("shutting_down" if self._stopping else "kafka_not_ready")
        if producer.fatal is not None:
            raise Unavailable("kafka_error", producer.fatal.str())
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
        loop = asyncio.get_running_loop()
        started = loop.time()
        request = _Request(started + self._timeout, loop.create_future(), n, timestamp_ms)
        outbox = self._outbox
        for key, value in records:
            outbox.append((request, key, value, len(key) + len(value) + RECORD_OVERHEAD_BYTES))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop.call_soon(self._drain)
        self._waits.append(request)
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_at(max(request.deadline, started + SWEEP_INTERVAL_S), self._sweep)
        try:
            # The sweeper cancels only this future at the deadline; the records keep
            # their bytes budgeted until Kafka settles them (see the module docstring).
            await request.future
        except asyncio.CancelledError:
            if not request.expired:
                raise
            raise Unavailable("publish_timeout", f"no ack within {self._timeout}s") from None
        except (Unavailable, TooLarge):
            raise
        except DeliveryFailed as exc:
            if exc.too_large:
                raise TooLarge(str(exc)) from None
            raise Unavailable("kafka_error", repr(exc)) from None
        except Exception as exc:  # noqa: BLE001 - whatever the producer reports, the answer is 503
            raise Unavailable("kafka_error", repr(exc)) from None
        finally:
            request.active = False
            waits = self._waits
            while waits and not waits[0].active:  # acks mostly come in order: O(1) amortised
                waits.popleft()
        self._metrics.publish_latency(loop.time() - started)

    def _drain(self) -> None:
        """Hand the records of this loop iteration to librdkafka in one go.

        Deferring to the end of the iteration costs nothing in latency, and records
        produced back to back wake librdkafka's broker thread once rather than once
        per request (each wake-up costs the loop ~10 us of blocking in produce())."""
        self._drain_scheduled = False
        outbox, self._outbox = self._outbox, []
        producer = self.producer
        delivered = self._delivered
        topic = self._topic
        if producer is not None:
            producer.poll()  # acks that came in meanwhile: answered now, not at the next timer
        for request, key, value, cost in outbox:
            if request.unsent:  # an earlier record of its request was refused
                self._release(cost)
                continue
            if producer is None:
                self._refuse(request, cost, Unavailable("shutting_down"))
                continue
            try:
                producer.send(topic, value, key, request.timestamp_ms, partial(delivered, request, cost))
            except BufferError:
                self._refuse(request, cost, Unavailable("backpressure", "producer queue full"))
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    self._refuse(request, cost, TooLarge(str(exc)))
                else:
                    self._refuse(request, cost, Unavailable("kafka_error", repr(exc)))
            except Exception as exc:  # noqa: BLE001 - whatever the producer raises, the answer is 503
                self._refuse(request, cost, Unavailable("kafka_error", repr(exc)))

    def _release(self, cost: int) -> None:
        self.inflight_bytes -= cost
        self.inflight_events -= 1

    def _refuse(self, request: _Request, cost: int, exc: Exception) -> None:
        """librdkafka refused a record: fail its request; its later records are not
        sent (those already sent still settle through their delivery reports)."""
        self._release(cost)
        request.unsent = True
        if not request.future.done():
            request.future.set_exception(exc)

    def _sweep(self) -> None:
        """Expire overdue publishes by cancelling the future their request awaits."""
        self._sweep_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        waits = self._waits
        while waits:
            request = waits[0]
            if request.active:
                if request.deadline > now:
                    break
                request.active = False
                request.expired = True
                request.future.cancel()
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


async def _quiet_stop(producer: Any) -> None:
    try:
        await producer.stop(0)  # it never took a record: nothing to flush
    except Exception:  # noqa: BLE001 - best-effort cleanup of a producer that never ran
        log.debug("collector.producer_stop_failed", exc_info=True)
