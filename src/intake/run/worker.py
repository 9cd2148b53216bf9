"""The worker process of ``intake serve``: the processor, the outbox sender and the scheduler
(SLA sweep, digests), until the listener tells it to stop (see :mod:`intake.run.service`).

It runs at a lower CPU priority than the listener (see :func:`_yield_cpu_to_listener`), copies
the SQLite WAL into the database file after each batch, and holds the outbox sender back while
there is a backlog of mail to act on. Only this process imports this module and what it uses:
the listener starts it by name, so it never holds the processing stack.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from pathlib import Path

from sqlalchemy import Engine

from intake.config.settings import Settings, load_settings
from intake.processes import return_large_buffers
from intake.run import metrics, processor, scheduler
from intake.run.logs import configure_logging
from intake.run.process_flag import ProcessFlag
from intake.send.outbox import OutboxSender, make_transport
from intake.store import audit, claims, key_rotation, sealing
from intake.store.db import checkpoint, make_engine
from intake.tickets import undeliverable
from intake.understand import parse_guard

log = logging.getLogger(__name__)


def worker_main(config_path: str | None, wake: ProcessFlag, stop: ProcessFlag, parent_pid: int,
                metrics_pipe: Connection | None) -> None:
    """Entry point of the worker process: processor, outbox and scheduler until told to stop."""
    # The parent coordinates shutdown; a terminal's Ctrl-C reaches us too and must not cut a batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _yield_cpu_to_listener()
    return_large_buffers()  # one large message's bytes at a time, given back once done
    settings = load_settings(Path(config_path) if config_path else None)
    configure_logging(settings.logging)
    try:
        asyncio.run(_work(settings, wake, stop, parent_pid, metrics.WorkerReport(metrics_pipe)))
    except Exception:
        # One structured line (multiprocessing would print a bare traceback); the parent restarts us.
        log.exception("event=worker-crashed")
        sys.exit(1)


# How far the worker lowers its CPU priority (nice). The parse helper goes all the way to 19.
WORKER_NICENESS = 10


def _yield_cpu_to_listener() -> None:
    """Lower this process's CPU priority part of the way, before it starts any thread (threads
    inherit it): when the listener and the worker want the same core, the listener's 250s come
    first. Not all the way (the parse helper, which holds no lock, is at 19): the worker holds the
    database's write lock while it writes, and the listener's commits wait for that lock; starved
    at nice 19, a worker holding it kept them waiting far longer (measured: lock held up to 190 ms
    against ~40 ms)."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError as exc:  # a sandbox that forbids it: run at the priority we have
        log.warning("event=worker-priority-unchanged error=%s", exc)


class _SenderPacing:
    """Tells the outbox sender when to run: woken once mail was queued and the processor has
    caught up; held back (see :meth:`OutboxSender.run`) while its batches come back full."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self.backlog = asyncio.Event()
        self._queued = False  # mail queued since the sender was last woken

    def after(self, result: processor.BatchResult) -> None:
        if result.full:  # a full batch: more mail is waiting to be acted on
            self.backlog.set()
        else:
            self.backlog.clear()
        self._queued |= bool(result.tickets_opened)
        if self._queued and not self.backlog.is_set():
            self.wake.set()
            self._queued = False


def _process_batch(engine: Engine, settings: Settings) -> processor.BatchResult:
    """One batch, then a checkpoint: the worker copies the WAL into the database file, so that no
    commit in front of a 250 has to (see :func:`intake.store.db.make_engine`)."""
    result = processor.process_batch(engine, settings, datetime.now(timezone.utc))
    checkpoint(engine)
    return result


async def _work(settings: Settings, wake: ProcessFlag, stop_flag: ProcessFlag, parent_pid: int,
                report: metrics.WorkerReport) -> None:
    keyring = key_rotation.storage_keyring(settings)  # the parent read and checked it
    engine = sealing.attach(make_engine(settings.database_url, settings.database.busy_timeout,
                                        checkpoint_on_commit=False), keyring)
    audit.configure(settings)
    stop = asyncio.Event()
    pacing = _SenderPacing()
    sender = OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record,
                          on_record=report.outbox)
    sending = asyncio.create_task(sender.run(stop, pacing.wake, busy=pacing.backlog))
    loop = asyncio.get_running_loop()
    jobs = scheduler.build_scheduler(engine, settings, on_queued=lambda: loop.call_soon_threadsafe(pacing.wake.set))
    if settings.scheduler.enabled:
        jobs.start()
    try:  # restarted after a crash: what the dead worker had claimed on this host is taken up at once
        released = await asyncio.to_thread(claims.release_dead, engine, datetime.now(timezone.utc))
    except Exception:  # noqa: BLE001 - e.g. the database is down: those claims then run out by their lease
        log.exception("event=claims-release-failed")
        released = 0
    log.info("event=worker-ready pid=%d released_claims=%d", os.getpid(), released)
    poll = settings.processing.poll_interval
    while True:
        # A parent killed with SIGKILL cannot tell us to stop; being re-parented means it is gone.
        if stop_flag.is_set() or os.getppid() != parent_pid:
            break
        try:
            result = await asyncio.to_thread(_process_batch, engine, settings)
        except Exception:  # noqa: BLE001 - e.g. database unreachable: wait and try again
            log.exception("event=processor-error")
            await asyncio.sleep(poll)
        else:
            pacing.after(result)
            report.batch(result.decisions, len(result.failed), result.seconds)
            report.claims(result.claimed, result.reclaimed)
            if result.claimed:
                continue
        await asyncio.to_thread(wake.wait, poll)
        wake.clear()
    if jobs.running:
        await asyncio.to_thread(jobs.shutdown, wait=True)  # a sweep in progress finishes its page
    stop.set()
    pacing.wake.set()
    await sending
    parse_guard.close()
    engine.dispose()
