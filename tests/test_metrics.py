"""The figures behind the metrics and /readyz, read from a real database at an explicit time, and
the [metrics] section's rules."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import deliver_outbox, process, report
from intake.config.sections import MetricsSection
from intake.config.settings import ConfigError
from intake.run import metrics, readings
from intake.store import inbound
from intake.store.db import make_engine


def _store_report(engine, received, subject="XSS in the login form"):  # type: ignore[no-untyped-def]
    inbound.store(engine, [inbound.Arrival("alice@researcher.test", ["security@example.com"], "127.0.0.1", "test",
                                           report(subject=subject).as_bytes(), received)])


def _samples(engine) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """What the database collector exposes, through the real text format and parser."""
    text = generate_latest(metrics.build_registry(engine)).decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def test_readings_follow_tickets_outbox_and_deadlines_at_an_explicit_time(make_settings):
    settings = make_settings()  # the shipped "vaixus" policy: acknowledge within 72 hours, by a person
    engine = make_engine(settings.database_url)
    now = datetime.now(timezone.utc)
    received = now - timedelta(hours=1)
    _store_report(engine, received)
    assert readings.read(engine, now).inbound_pending == 1

    process(settings, engine, now)
    figures = readings.read(engine, now)
    assert (figures.tickets, figures.inbound_pending, figures.outbox_pending, figures.outbox_dead) == (1, 0, 1, 0)
    assert figures.outbox_oldest_pending == now  # queued by processing at *now*
    assert readings.outbox_oldest_pending(engine) == now
    assert (figures.breaches, figures.open_breaches) == (0, 0)

    past_due = readings.read(engine, received + timedelta(hours=72, seconds=1))
    assert (past_due.breaches, past_due.open_breaches) == (1, 1)  # acknowledge stage unmet past due

    deliver_outbox(settings, engine, now)
    assert readings.read(engine, now).outbox_pending == 0
    assert readings.read(engine, now).outbox_oldest_pending is None


def test_the_database_collector_exposes_the_readings(make_settings):
    settings = make_settings()
    engine = make_engine(settings.database_url)
    assert _samples(engine)["intake_tickets_opened_total"] == 0
    _store_report(engine, datetime.now(timezone.utc))
    process(settings, engine)
    values = _samples(engine)
    assert values["intake_database_up"] == 1
    assert values["intake_tickets_opened_total"] == 1
    assert values["intake_outbox_pending"] == 1
    assert values["intake_outbox_oldest_age_seconds"] >= 0
    assert values["intake_sla_breaches_total"] == 0


def test_an_unreadable_database_makes_the_scrape_say_so_not_fail(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'no-schema.db'}")  # no tables
    values = _samples(engine)
    assert values["intake_database_up"] == 0
    assert "intake_tickets_opened_total" not in values
    assert values["intake_messages_failed_total"] >= 0  # the event counters are still there


@pytest.mark.parametrize("listen", ["127.0.0.1:9125", "127.0.0.2:0", "[::1]:9125", "localhost:9125"])
def test_loopback_addresses_are_accepted(listen: str):
    assert MetricsSection(listen=listen).listen == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:9125", "192.0.2.1:9125", "[::]:9125"])
def test_a_non_loopback_address_is_refused_unless_allowed(listen: str):
    with pytest.raises(ValueError, match="not a loopback address"):
        MetricsSection(listen=listen)
    assert MetricsSection(listen=listen, allow_remote=True).allow_remote


def test_a_host_name_is_refused(make_settings):
    with pytest.raises(ConfigError, match="metrics.listen"):
        make_settings(INTAKE_METRICS__LISTEN="metrics.example.com:9125")
    with pytest.raises(ConfigError, match="logging.format"):
        make_settings(INTAKE_LOGGING__FORMAT="xml")
