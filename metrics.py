"""Prometheus metrics for GET /metrics, aggregated over every worker of the node.

Under gunicorn, gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory
per master before any worker imports this module, so each worker writes its own
files there and a scrape of any worker sums them all. Without it (the flask CLI,
tests on the test client) the values live in this process.
"""
import hmac
import ipaddress
import os
import time

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # set for gunicorn; the CLI may inherit it too
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

# prometheus_client reads PROMETHEUS_MULTIPROC_DIR at import.
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry,  # noqa: E402
                               Counter, Gauge, Histogram, generate_latest, multiprocess, values)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

import this_process  # noqa: E402

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Every update checks for a fork; by default with a getpid system call each time.
    values.ValueClass = values.MultiProcessValue(process_identifier=this_process.pid)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter("tokenopen_requests_total", "Requests served, by model and HTTP status.",
                   ["model", "status"])
DURATION = Histogram("tokenopen_request_duration_seconds",
                     "Time from the request to its last byte.", buckets=LATENCY_BUCKETS)
TTFT = Histogram("tokenopen_ttft_seconds", "Time to the upstream's first byte.",
                 buckets=LATENCY_BUCKETS)
TOKENS = Counter("tokenopen_tokens_total", "Tokens metered, by model and direction.",
                 ["model", "direction"])
CREDITS = Counter("tokenopen_credits_micro_total", "Micro-credits charged, by model.", ["model"])
IN_FLIGHT = Gauge("tokenopen_requests_in_flight", "Requests being served right now.",
                  multiprocess_mode="livesum")


def request_started():
    """One more request in flight (observe_request takes it away)."""
    IN_FLIGHT.inc()


def observe_request(flight, usage, charged, http_status):
    """Record one finished /v1 request; never raises."""
    try:
        IN_FLIGHT.dec()
        # Only a priced model is a label: a flood of made-up names must not grow the series.
        model = flight.call.model if flight.price is not None and flight.call else ""
        REQUESTS.labels(model=model, status=str(http_status)).inc()
        DURATION.observe(time.monotonic() - flight.started)
        if flight.ttft_ms is not None:
            TTFT.observe(flight.ttft_ms / 1000)
        if usage.prompt_tokens:
            TOKENS.labels(model=model, direction="input").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            TOKENS.labels(model=model, direction="output").inc(usage.completion_tokens)
        if charged:
            CREDITS.labels(model=model).inc(charged)
    except Exception:  # noqa: BLE001 - metrics must never fail a request
        pass


def channel_health():
    """tokenopen_channel_up{channel}: 1 when enabled and not cooling down, read at scrape."""
    from extensions import db
    from models import Channel, utcnow
    family = GaugeMetricFamily("tokenopen_channel_up",
                               "1 when the channel is enabled and not in cool-down.",
                               labels=["channel"])
    now = utcnow()
    for channel in db.session.scalars(db.select(Channel).order_by(Channel.name)):
        up = channel.enabled and not (channel.cooldown_until and channel.cooldown_until > now)
        family.add_metric([channel.name], 1 if up else 0)
    return family


def exposition():
    """(body, content type) of the Prometheus text for this node."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    channels = CollectorRegistry()
    channels.register(_Collect(channel_health))
    return generate_latest(registry) + generate_latest(channels), CONTENT_TYPE_LATEST


def may_scrape(remote_addr, forwarded, authorization, token):
    """(allowed, status if not): loopback clients freely, others with the Bearer token.
    A request a proxy forwarded is not loopback, whatever address it came from."""
    try:
        loopback = ipaddress.ip_address(remote_addr or "").is_loopback
    except ValueError:
        loopback = False
    if loopback and not forwarded:
        return True, None
    if not token:
        return False, 404
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()), 401


class _Collect:
    def __init__(self, fn):
        self.fn = fn

    def collect(self):
        yield self.fn()

    def describe(self):
        return []
