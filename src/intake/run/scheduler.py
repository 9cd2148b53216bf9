"""APScheduler wiring: the thin jobs ``intake serve``'s worker runs on a schedule.

* ``sweep`` every ``[scheduler] sweep_interval`` seconds, first at start-up (the catch-up after
  downtime): :func:`intake.sla.reminders.sweep`.
* one job per ``[scheduler.digests.<name>]``, on its cron line in its own time zone:
  :func:`intake.sla.digest.send`.
* ``purge`` once a day, first PURGE_DELAY after start-up (a restart loop does not purge in a
  loop), when ``[retention]`` sets any period: :func:`intake.tickets.retention.purge`, without
  ``rewrite`` (that blocks writers: the operator's choice).

APScheduler 3.x (4.x is still alpha) with its in-memory job store: nothing is remembered across a
restart, so a digest whose time passed while intake was stopped is not fired late; while running,
a run that starts late (a suspended machine, a long sweep) runs once (``coalesce``) if within
``misfire_grace`` and is skipped otherwise. Jobs run one at a time in one thread, so a sweep and a
digest never overlap. Exactly-once does not rest on any of that: the notification keys do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine

from intake.config.settings import Settings
from intake.sla import digest, reminders
from intake.tickets import retention
from intake.vocabulary import DigestStatus

log = logging.getLogger(__name__)
PURGE_INTERVAL = timedelta(days=1)
PURGE_DELAY = timedelta(minutes=10)


def build_scheduler(engine: Engine, settings: Settings, on_queued: Callable[[], None] = lambda: None
                    ) -> BackgroundScheduler:
    """A scheduler (not started) with the sweep and digest jobs; *on_queued* is called after a job
    queued mail, to wake the outbox sender."""
    config = settings.scheduler
    scheduler = BackgroundScheduler(
        timezone=timezone.utc,
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": int(config.misfire_grace)},
    )

    def run_sweep() -> None:
        try:
            result = reminders.sweep(engine, settings, datetime.now(timezone.utc))
        except Exception:  # noqa: BLE001 - a database hiccup must not stop the schedule
            log.exception("event=sweep-error")
            return
        if result.mails:
            on_queued()

    def run_digest(name: str) -> None:
        try:
            outcome = digest.send(engine, settings, name, datetime.now(timezone.utc))
        except Exception:  # noqa: BLE001
            log.exception("event=digest-error name=%s", name)
            return
        log.info("event=digest name=%s status=%s key=%s", name, outcome.status, outcome.digest.key)
        if outcome.status == DigestStatus.SENT:
            on_queued()

    def run_purge() -> None:
        try:
            report = retention.purge(engine, settings, datetime.now(timezone.utc))
        except Exception:  # noqa: BLE001
            log.exception("event=purge-error")
            return
        tickets, held, mail = report.tickets, report.held, report.sent_mail
        log.info("event=purge tickets=%d legal_hold=%d held=%d sent_mail=%d", len(tickets.purged) if tickets else 0,
                 len(tickets.legal_hold) if tickets else 0, held.total if held else 0,
                 sum(mail.by_kind.values()) if mail else 0)
        for problem in report.reclaimed.incomplete if report.reclaimed else []:
            log.warning("event=purge-incomplete reason=%r", problem)

    scheduler.add_job(run_sweep, IntervalTrigger(seconds=config.sweep_interval), id="sweep",
                      next_run_time=datetime.now(timezone.utc))
    if any(settings.retention.period(name) for name in ("after_close", "held", "sent_mail")):
        scheduler.add_job(run_purge, IntervalTrigger(seconds=PURGE_INTERVAL.total_seconds()), id="purge",
                          next_run_time=datetime.now(timezone.utc) + PURGE_DELAY)
    for name, schedule in config.digests.items():
        scheduler.add_job(run_digest, schedule.trigger(), args=[name], id=f"digest:{name}")
    return scheduler
