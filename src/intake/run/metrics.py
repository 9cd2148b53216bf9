"""The metrics endpoint of ``intake serve``: ``/metrics`` (Prometheus), ``/livez`` and ``/readyz``.

One HTTP server on ``[metrics] listen`` (loopback unless ``allow_remote``), in a thread of the
main process, answering one request at a time (see :class:`_QuietHandler`). Two kinds of
figures, chosen by where they are true:

* **State, read from the database at scrape time** (:mod:`intake.run.readings`): tickets opened,
  outbox pending / oldest age / dead, SLA breaches, inbound backlog, mail held in the last week. Right across restarts and
  the same on every node of a shared PostgreSQL database (aggregate them with ``max``, not ``sum``).
* **Events, counted where they happen**: SMTP outcomes in the listener (this process), and the
  worker's (messages processed by decision, processing time, outbox delivery attempts). The
  worker is another process: it sends its counts over a pipe (:class:`WorkerChannel`) and this
  process adds them to its own counters, so one registry serves everything. Why not
  prometheus_client's multiprocess mode: it needs its directory set before the library is
  imported, files cleaned of dead workers, and per-gauge merge modes; a pipe of a few small
  messages per batch needs none of that. The counters are per node and start at zero with the
  process, as Prometheus counters may (``rate()`` copes with resets).

Every labelled series exists, at zero, from the start: each label value is touched at import.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from sqlalchemy import Engine

from intake.config.sections import MetricsSection
from intake.run import readings
from intake.tickets.held import HELD_LABELS
from intake.vocabulary import DECISIONS

log = logging.getLogger(__name__)

# SMTP outcomes counted by the listener: a message stored (250), a recipient refused (550), one
# recipient too many (452), a message over smtp.max_message_size (552), DATA past the listener's
# smtp.memory_budget (452 4.3.1), DATA the process had no memory for (MemoryError: 452 4.3.1), a
# store that failed (451), a store that did not answer within smtp.store_timeout (451).
RECEIVED_RESULTS = ("accepted", "rejected-recipient", "too-many-recipients", "too-big", "memory-budget",
                    "out-of-memory", "store-failed", "store-timeout")
OUTBOX_OUTCOMES = ("sent", "retry", "dead")
# How long /livez waits for the event loop to run a no-op before calling it stuck.
LIVENESS_TIMEOUT = 5.0

RECEIVED = Counter("intake_messages_received", "SMTP transactions by result (accepted: stored and answered 250).",
                   ["result"], registry=None)
PROCESSED = Counter("intake_messages_processed", "Stored messages the processor decided on, by decision.",
                    ["decision"], registry=None)
FAILED = Counter("intake_messages_failed", "Stored messages processing failed on (kept for `intake reprocess`).",
                 registry=None)
PROCESSING = Histogram("intake_processing_seconds",
                       "Seconds from a message's batch being taken up to its outcome being written.",
                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=None)
CLAIMED = Counter("intake_inbound_claimed", "Stored messages this node's processor claimed to act on.", registry=None)
RECLAIMED = Counter("intake_inbound_reclaimed",
                    "Claimed messages taken over from a processor whose claim had run out (a node that died).",
                    registry=None)
OUTBOX_SENT = Counter("intake_outbox_sent", "Outbox delivery attempts by outcome (retry: temporary failure).",
                      ["outcome"], registry=None)
WORKER_RESTARTS = Counter("intake_worker_restarts", "Times the worker process died and was started again.",
                          registry=None)
FETCH_STORED = Counter("intake_fetch_stored", "Messages stored from each [[fetch]] source.", ["source"], registry=None)
FETCH_LAST_SUCCESS = Gauge("intake_fetch_last_success_timestamp_seconds",
                           "When each [[fetch]] source last finished a pass (Unix time; 0: not yet).", ["source"],
                           registry=None)
FETCH_FAILURES = Gauge("intake_fetch_failures", "Failed passes in a row of each [[fetch]] source (0: it works).",
                       ["source"], registry=None)
STORE_STALLED = Gauge("intake_store_stalled_seconds",
                      "Seconds the listener's commit thread has been on its current commit (0 between commits).",
                      registry=None)
STORE_STUCK = Gauge("intake_store_stuck", "1 while the listener's current commit has run longer than "
                    "smtp.store_timeout (new DATA gets 451 at once), else 0.", registry=None)
_EVENT_METRICS = (RECEIVED, PROCESSED, FAILED, PROCESSING, CLAIMED, RECLAIMED, OUTBOX_SENT, WORKER_RESTARTS,
                  FETCH_STORED, FETCH_LAST_SUCCESS, FETCH_FAILURES, STORE_STALLED, STORE_STUCK)

for _result in RECEIVED_RESULTS:
    RECEIVED.labels(_result)
for _decision in DECISIONS:
    PROCESSED.labels(_decision)
for _outcome in OUTBOX_OUTCOMES:
    OUTBOX_SENT.labels(_outcome)


def fetch_pass(source: str, finished: datetime | None, ok: bool) -> None:
    """A pass of fetch source *source* ended, *ok* (at *finished*) or not."""
    if ok and finished is not None:
        FETCH_LAST_SUCCESS.labels(source).set(finished.timestamp())
        FETCH_FAILURES.labels(source).set(0)
    else:
        FETCH_FAILURES.labels(source).inc()


def received(result: str) -> None:
    """Count one SMTP outcome (one of :data:`RECEIVED_RESULTS`)."""
    RECEIVED.labels(result).inc()


class DatabaseCollector:
    """The figures of :mod:`intake.run.readings`, read at each scrape. If the database cannot be read,
    the scrape still answers, with ``intake_database_up 0`` and without them."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self._engine = engine
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        return []  # no query when the collector is registered

    def collect(self) -> Iterable[Metric]:
        now = self._clock()
        try:
            figures = readings.read(self._engine, now)
        except Exception as exc:  # noqa: BLE001 - the scrape must answer with what it has
            log.warning("event=metrics-database-error error=%r", exc)
            yield GaugeMetricFamily("intake_database_up", "1 when the database answered this scrape.", value=0)
            return
        yield GaugeMetricFamily("intake_database_up", "1 when the database answered this scrape.", value=1)
        yield CounterMetricFamily("intake_tickets_opened", "Tickets opened (all nodes, since the database began).",
                                  value=figures.tickets)
        yield GaugeMetricFamily("intake_inbound_pending", "Stored messages not processed yet.",
                                value=figures.inbound_pending)
        yield GaugeMetricFamily("intake_inbound_failed", "Stored messages processing failed on.",
                                value=figures.inbound_failed)
        yield GaugeMetricFamily("intake_outbox_pending", "Mails waiting in the outbox (due or backing off).",
                                value=figures.outbox_pending)
        oldest = figures.outbox_oldest_pending
        yield GaugeMetricFamily("intake_outbox_oldest_age_seconds",
                                "Age of the oldest mail waiting in the outbox; 0 when none waits.",
                                value=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
        yield GaugeMetricFamily("intake_outbox_dead", "Mails the outbox gave up on (see `intake outbox`).",
                                value=figures.outbox_dead)
        held = GaugeMetricFamily("intake_held_messages", f"Stored messages held (no ticket of their own) in the last "
                                 f"{readings.HELD_WINDOW.days} days, by decision (failed: processing failed).",
                                 labels=["decision"])
        for label in HELD_LABELS:  # every series, at zero when none
            held.add_metric([label], figures.held.get(label, 0))
        yield held
        yield CounterMetricFamily("intake_sla_breaches", "SLA stages breached: met late, or unmet past due on an "
                                  "open ticket.", value=figures.breaches)
        yield GaugeMetricFamily("intake_sla_breaches_open", "SLA stages unmet past their due time on open tickets.",
                                value=figures.open_breaches)


def build_registry(engine: Engine) -> CollectorRegistry:
    """A registry with the event counters, the database figures and the process's own metrics."""
    registry = CollectorRegistry(auto_describe=True)
    for metric in _EVENT_METRICS:
        registry.register(metric)
    registry.register(DatabaseCollector(engine))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# -- the worker's counts ------------------------------------------------------------------------


class WorkerReport:
    """The worker's side of a :class:`WorkerChannel`: sends what it did. A no-op without a pipe
    (metrics disabled); a pipe whose reader is gone (the main process died) is ignored."""

    def __init__(self, pipe: Connection | None):
        self._pipe = pipe

    def batch(self, decisions: dict[str, int], failed: int, seconds: list[float]) -> None:
        if decisions or failed:
            self._send(("batch", dict(decisions), failed, list(seconds)))

    def claims(self, claimed: int, reclaimed: int) -> None:
        if claimed:
            self._send(("claims", claimed, reclaimed))

    def outbox(self, outcome: str) -> None:
        self._send(("outbox", outcome))

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.send(message)
        except OSError:
            self._pipe = None


class WorkerChannel:
    """A pipe from one worker process to this one, drained into the event counters by a thread
    that ends when the worker does (its end of the pipe closes). One per worker started, so a
    worker killed half-way through a write can never wedge the next one's."""

    def __init__(self, context: Any):
        self._reader, self.writer = context.Pipe(duplex=False)

    def started(self) -> None:
        """Call once the worker has started: drop our copy of its end and start draining."""
        self.writer.close()
        threading.Thread(target=self._drain, name="intake-worker-metrics", daemon=True).start()

    def _drain(self) -> None:
        with self._reader:
            while True:
                try:
                    message = self._reader.recv()
                except (EOFError, OSError):
                    return
                apply(message)


def apply(message: tuple[Any, ...]) -> None:
    """Add one message of a :class:`WorkerReport` to this process's counters."""
    if message[0] == "batch":
        _, decisions, failed, seconds = message
        for decision, count in decisions.items():
            PROCESSED.labels(decision).inc(count)
        FAILED.inc(failed)
        for value in seconds:
            PROCESSING.observe(value)
    elif message[0] == "claims":
        CLAIMED.inc(message[1])
        RECLAIMED.inc(message[2])
    elif message[0] == "outbox":
        OUTBOX_SENT.labels(message[1]).inc()


# -- health and the HTTP server -----------------------------------------------------------------


class StoreWatch:
    """Whether the listener's store is stuck: its commit thread has been on one commit for longer
    than *timeout* (``smtp.store_timeout``; every message in it has had its 451 by then).
    *stalled* is :meth:`intake.store.group_commit.GroupCommitter.stalled`. The gauges
    ``intake_store_stalled_seconds`` and ``intake_store_stuck`` read this watch."""

    def __init__(self, stalled: Callable[[], float], timeout: float):
        self.stalled = stalled
        self.timeout = timeout  # the service sets it again on a reload
        self._stuck = False  # as the last check found it
        STORE_STALLED.set_function(stalled)
        STORE_STUCK.set_function(lambda: float(self.stuck()))

    def stuck(self) -> bool:
        return self.stalled() > self.timeout

    def check(self) -> bool:
        """Whether the store is stuck now; the start and the end of each stuck spell are logged."""
        stalled = self.stalled()
        stuck = stalled > self.timeout
        if stuck and not self._stuck:
            log.error("event=store-stuck stalled_s=%.0f limit_s=%g detail=%r", stalled, self.timeout,
                      "no commit has finished since; DATA gets 451 (is the disk or the database hung?)")
        elif self._stuck and not stuck:
            log.warning("event=store-recovered")
        self._stuck = stuck
        return stuck

    def describe(self) -> str:
        """/readyz's word on the store: "ok" or why not."""
        stalled = self.stalled()
        if stalled <= self.timeout:
            return "ok"
        return (f"stuck: the listener's commit has run {stalled:.0f} s (limit {self.timeout:g} s); "
                "DATA gets 451: is the disk or the database hung?")


@dataclass
class Health:
    """What /livez and /readyz look at."""

    loop: asyncio.AbstractEventLoop
    engine: Engine
    listener_up: Callable[[], bool]
    worker_up: Callable[[], bool]
    outbox_stuck_after: float
    # Each [[fetch]] source's name and check ("ok", or why not), as the fetch threads see it.
    fetch_checks: Callable[[], dict[str, str]] = dict
    store: StoreWatch | None = None  # the listener's commit thread (None: not watched)
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)

    def live(self) -> tuple[bool, str]:
        """Alive: the event loop runs a no-op within :data:`LIVENESS_TIMEOUT`."""
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop).result(LIVENESS_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - timeout, or a closed loop
            return False, f"event loop not responding: {type(exc).__name__}"
        return True, "ok"

    def ready(self) -> tuple[bool, dict[str, str]]:
        """Ready: the database answers, the listener accepts and commits, the worker runs, the outbox moves."""
        checks = {"database": "ok", "listener": "ok", "worker": "ok", "outbox": "ok"}
        if self.store is not None:
            checks["store"] = self.store.describe()
        try:
            readings.database_reachable(self.engine)
            oldest = readings.outbox_oldest_pending(self.engine)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the answer
            checks["database"] = f"unreachable: {type(exc).__name__}: {exc}"[:300]
            checks["outbox"] = "unknown (no database)"
        else:
            age = (self.clock() - oldest).total_seconds() if oldest else 0.0
            if age > self.outbox_stuck_after:
                checks["outbox"] = (f"stuck: the oldest mail waiting was queued {age:.0f} s ago "
                                    f"(limit {self.outbox_stuck_after:g} s); is the relay reachable?")
        if not self.listener_up():
            checks["listener"] = "not accepting connections"
        if not self.worker_up():
            checks["worker"] = "not running"
        checks.update({f"fetch:{name}": check for name, check in self.fetch_checks().items()})
        return all(value == "ok" for value in checks.values()), checks


class _WSGIServer6(WSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    # One request at a time, on the server's own thread: a thread per request could not be
    # started under an address-space limit (its stack reservation failed), just when the metrics
    # matter. A client gets this long to send its request, so a silent one holds up the others
    # (and the shutdown) at most that long.
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not news; wsgiref would write each one to stderr, unstructured."""


def wsgi_app(registry: CollectorRegistry, health: Health) -> Callable:
    """/metrics, /livez and /readyz; 404 for anything else."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/livez":
            ok, text = health.live()
            return _answer(start_response, ok, "text/plain; charset=utf-8", text + "\n")
        if path == "/readyz":
            ok, checks = health.ready()
            body = json.dumps({"status": "ready" if ok else "not ready", "checks": checks}, indent=1)
            return _answer(start_response, ok, "application/json", body + "\n")
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /livez or /readyz\n"]

    return app


def _answer(start_response: Callable, ok: bool, content_type: str, body: str) -> list[bytes]:
    start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", content_type),
                                                                    ("Cache-Control", "no-store")])
    return [body.encode()]


class MetricsServer:
    """The HTTP server, serving in a daemon thread until :meth:`close`."""

    def __init__(self, section: MetricsSection, registry: CollectorRegistry, health: Health):
        address = section.listen_address
        self._server = make_server(address.host, address.port, wsgi_app(registry, health),
                                   server_class=_WSGIServer6 if ":" in address.host else WSGIServer,
                                   handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="intake-metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
