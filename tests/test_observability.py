"""`intake serve` as a real subprocess, watched as an operator would: /metrics scraped over HTTP and
parsed with Prometheus' own parser, /livez and /readyz, and its stderr read as logfmt or JSON."""

from __future__ import annotations

import json
import os
import smtplib
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, report, smtp_send
from intake.run import metrics
from intake.store import inbound, schema
from intake.store.db import make_engine
from intake.tickets.held import HELD_LABELS
from intake.vocabulary import DECISIONS, NEW_TICKET
from test_logs import parse_logfmt
from test_serve import serve, serve_env  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

BODY_MARKER = "Zanzibar-quokka-7731 overflow in the frobnicator"


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by name and labels."""
    status, text = _get(port, "/metrics")
    assert status == 200, text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_until(predicate, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


@pytest.fixture
def metrics_port(serve_env: dict[str, str]) -> int:  # noqa: F811 - the imported fixture
    port = free_port()
    serve_env.update(INTAKE_METRICS__LISTEN=f"127.0.0.1:{port}", INTAKE_SMTP__MAX_MESSAGE_SIZE="8192")
    serve_env.pop("JOURNAL_STREAM", None)
    return port


def _log_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line]


def test_metrics_count_what_happens_and_logs_are_logfmt_without_bodies(serve, serve_env, metrics_port, sink):  # noqa: F811
    # A report received 100 hours ago under the shipped 72-hour policy: a breach once processed.
    engine = make_engine(serve_env["INTAKE_DATABASE__URL"])
    schema.upgrade(engine)
    inbound.store(engine, [inbound.Arrival("old@researcher.test", ["security@example.com"], "127.0.0.1", "test",
                                           report(subject="Old report", sender="old@researcher.test").as_bytes(),
                                           datetime.now(timezone.utc) - timedelta(hours=100))])
    engine.dispose()
    server = serve()
    server.start()
    assert _get(metrics_port, "/livez") == (200, "ok\n")

    smtp_send(server.port, report(subject="Heap overflow", message_id="<obs-1@researcher.test>",
                                  body=f"Steps:\n{BODY_MARKER}\n"))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("alice@researcher.test", ["someone@elsewhere.test"], b"Subject: x\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # SIZE= over the limit: 552 at MAIL
            client.sendmail("alice@researcher.test", ["security@example.com"], b"x" * 10_000)
        assert refused.value.smtp_code == 552

    def two_sent():  # type: ignore[no-untyped-def]
        samples = scrape(metrics_port)
        return samples if value(samples, "intake_outbox_sent_total", outcome="sent") >= 2 else None

    samples = wait_until(two_sent, "two acknowledgements sent")
    assert value(samples, "intake_messages_received_total", result="accepted") == 1
    assert value(samples, "intake_messages_received_total", result="rejected-recipient") == 1
    assert value(samples, "intake_messages_received_total", result="too-big") == 1
    assert value(samples, "intake_messages_received_total", result="store-failed") == 0
    assert value(samples, "intake_messages_processed_total", decision=NEW_TICKET) == 2
    assert value(samples, "intake_tickets_opened_total") == 2
    assert value(samples, "intake_processing_seconds_count") == 2
    assert value(samples, "intake_inbound_claimed_total") == 2  # this node's processor took both
    assert value(samples, "intake_inbound_reclaimed_total") == 0
    assert value(samples, "intake_processing_seconds_bucket", le="+Inf") == 2
    assert value(samples, "intake_sla_breaches_total") == 1
    assert value(samples, "intake_sla_breaches_open") == 1
    assert value(samples, "intake_outbox_dead") == 0
    status, ready = _get(metrics_port, "/readyz")
    assert status == 200 and json.loads(ready)["status"] == "ready", ready
    assert server.stop() == 0

    lines = _log_lines(server.log)
    assert not [line for line in lines if BODY_MARKER in line or "Zanzibar" in line]
    records = [parse_logfmt(line) for line in lines]  # every line, not only ours
    assert all(record["level"] in ("debug", "info", "warning", "error", "critical") for record in records)
    [processed] = [r for r in records if r.get("event") == "processed" and r["message_id"] == "<obs-1@researcher.test>"]
    assert processed["decision"] == NEW_TICKET and processed["ticket"].startswith("SEC-")
    assert float(processed["parse_ms"]) >= 0 and float(processed["total_ms"]) >= float(processed["parse_ms"])
    assert any(r.get("event") == "accepted" and r["logger"] == "intake.receive.listener" for r in records)


def test_every_series_starts_at_zero_and_readyz_fails_when_the_outbox_is_stuck(serve, serve_env, metrics_port,  # noqa: F811
                                                                                  tmp_path):
    serve_env.update(INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{free_port()}",  # nobody listens: the relay is down
                     INTAKE_OUTBOUND__RETRY_INITIAL="0.2", INTAKE_OUTBOUND__RETRY_MAX="0.5",
                     INTAKE_METRICS__OUTBOX_STUCK_AFTER="1", INTAKE_LOGGING__FORMAT="json")
    server = serve()
    # Make stderr "the journal": $JOURNAL_STREAM names the log file serve writes to.
    server.log.touch()
    status = os.stat(server.log)
    serve_env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
    server.start()

    samples = scrape(metrics_port)
    for result in metrics.RECEIVED_RESULTS:
        assert value(samples, "intake_messages_received_total", result=result) == 0
    for decision in DECISIONS:
        assert value(samples, "intake_messages_processed_total", decision=decision) == 0
    for outcome in metrics.OUTBOX_OUTCOMES:
        assert value(samples, "intake_outbox_sent_total", outcome=outcome) == 0
    for label in HELD_LABELS:
        assert value(samples, "intake_held_messages", decision=label) == 0
    for name in ("intake_tickets_opened_total", "intake_outbox_pending", "intake_outbox_oldest_age_seconds",
                 "intake_outbox_dead", "intake_sla_breaches_total", "intake_processing_seconds_count",
                 "intake_messages_failed_total", "intake_worker_restarts_total", "intake_inbound_pending",
                 "intake_inbound_claimed_total", "intake_inbound_reclaimed_total"):
        assert value(samples, name) == 0, name
    assert value(samples, "intake_database_up") == 1
    assert _get(metrics_port, "/readyz")[0] == 200

    smtp_send(server.port, report(message_id="<stuck@researcher.test>"))
    wait_until(lambda: value(scrape(metrics_port), "intake_outbox_sent_total", outcome="retry") >= 1,
               "a failed delivery attempt")
    status_code, body = wait_until(lambda: (r := _get(metrics_port, "/readyz"))[0] == 503 and r,
                                   "/readyz to report the stuck outbox")
    checks = json.loads(body)["checks"]
    assert checks["outbox"].startswith("stuck") and checks["database"] == "ok" and checks["listener"] == "ok"
    samples = scrape(metrics_port)
    assert value(samples, "intake_outbox_pending") == 1
    assert value(samples, "intake_outbox_oldest_age_seconds") > 1
    assert value(samples, "intake_outbox_sent_total", outcome="sent") == 0
    assert _get(metrics_port, "/livez")[0] == 200  # stuck outbox: not ready, but alive
    assert _get(metrics_port, "/nothing")[0] == 404
    assert server.stop() == 0

    lines = _log_lines(server.log)
    prefixes = {"<3>": "error", "<4>": "warning", "<6>": "info", "<7>": "debug"}
    for line in lines:
        assert line[:3] in prefixes, line
        record = json.loads(line[3:])
        assert record["level"] == prefixes[line[:3]]
    records = [json.loads(line[3:]) for line in lines]
    assert any(r.get("event") == "outbox-retry" and isinstance(r["attempts"], int) for r in records)
    assert any(r.get("event") == "accepted" and isinstance(r["inbound_id"], int) for r in records)


def test_a_taken_metrics_port_costs_the_metrics_not_the_mail(serve, serve_env, metrics_port, sink):  # noqa: F811
    import socket

    with socket.create_server(("127.0.0.1", metrics_port)):
        server = serve()
        server.start()
        smtp_send(server.port, report(message_id="<no-metrics@researcher.test>"))
        assert sink.wait_for(1)
        assert server.stop() == 0
    records = [parse_logfmt(line) for line in _log_lines(server.log)]
    assert any(r.get("event") == "metrics-unavailable" and r["level"] == "error" for r in records)
