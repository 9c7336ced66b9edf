"""Log throttling for conditions that repeat per request.

Formatting is ``pipeline.logs`` (one JSON object per line; the message is an event
name such as ``collector.started`` and fields go through ``extra=``).
"""

from __future__ import annotations

import logging
import time
from typing import Any


class Throttle:
    """At most one log line per key and interval; the next line reports how many were skipped.

    For conditions that can repeat per request (Kafka down, backpressure), so an outage
    produces a handful of lines rather than one per refused hit.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        fields["suppressed"] = self._skipped.pop(key, 0)
        self._logger.log(level, msg, extra=fields)


class ThrottleFilter(logging.Filter):
    """Let through at most one record per message template and interval.

    For third-party loggers that log once per bad request: aiohttp.server writes an
    ERROR with traceback for every malformed HTTP request it rejects, which would let
    any client flood the logs. The next record that passes carries ``suppressed``.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return False
        self._last[key] = now
        record.suppressed = self._skipped.pop(key, 0)
        return True
