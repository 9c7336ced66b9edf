"""The HTTP collector: browser hits in, validated envelopes out to Kafka.

``create_app(collector, kafka)`` builds the aiohttp app; ``run(collector, kafka)``
serves it until SIGTERM / SIGINT (the ``pipeline`` CLI calls it).
"""

from .app import METRICS, PUBLISHER, TRANSPARENT_GIF, create_app, run, serve

__all__ = ["METRICS", "PUBLISHER", "TRANSPARENT_GIF", "create_app", "run", "serve"]
