"""``intake serve``: the listener in this process, the processor and outbox in a worker process.

Why two processes: accepting mail (aiosmtpd's event loop plus the group-commit writer) and
processing it (MIME parsing, ORM writes, rendering) are both CPU-bound Python; under one GIL
they slow each other down. The worker shares nothing with the listener but the database, so
it can also crash or restart without touching a single accepted message.

Accepting comes first: the worker runs at a lower CPU priority than the listener, it (not a
commit in front of a 250) copies the SQLite WAL into the database file, and its outbox sender
holds back while there is a backlog of mail to act on. The listener checkpoints only when the
WAL outgrows ``db.WAL_LIMIT`` (the worker is down, or load never lets the WAL start over).

systemd integration: ``READY=1`` once the listener is bound, ``WATCHDOG=1`` from the event
loop (a stuck loop stops the pings and systemd restarts us), ``STOPPING=1`` on SIGTERM. A clean
stop closes the listening socket, lets in-flight DATA commits finish, flushes the writer, lets
the worker finish its batch, and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import weakref
from datetime import datetime, timezone
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path

from sqlalchemy import Engine

from intake import processor
from intake.config import Settings, load_settings
from intake.db import WAL_LIMIT, checkpoint, create_schema, make_engine
from intake.inbound import GroupCommitter
from intake.listener import IntakeHandler, smtp_factory
from intake.outbox import OutboxSender, make_transport

log = logging.getLogger(__name__)

_WORKER_RESTART_DELAY = 1.0


def sd_notify(state: str) -> bool:
    """Send *state* to systemd's notify socket, if there is one (sd_notify(3) protocol)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError as exc:
            log.warning("event=sd-notify-failed error=%r", exc)
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd gave us, or None when it gave none to this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s %(message)s", force=True)
    # aiosmtpd logs every SMTP command at INFO, addresses included; our own lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # mail-parser warns about every MIME type it does not render; that is not news.
    logging.getLogger("mailparser").setLevel(logging.ERROR)


class Listener:
    """A bound SMTP listener and the connections it has open."""

    def __init__(self, server: asyncio.Server, handler: IntakeHandler, connections: weakref.WeakSet):
        self.server = server
        self.handler = handler
        self._connections = connections

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def bound(self) -> str:
        return ", ".join(str(s.getsockname()[:2]) for s in self.server.sockets)

    async def close_connections(self) -> None:
        self.server.close()
        for protocol in list(self._connections):
            if protocol.transport is not None:
                protocol.transport.close()
        await self.server.wait_closed()


async def start_listener(settings: Settings, committer: GroupCommitter) -> Listener:
    """Bind the SMTP listener on ``smtp.listen`` (port 0 picks a free port)."""
    handler = IntakeHandler(settings, committer)
    connections: weakref.WeakSet = weakref.WeakSet()
    make_smtp = smtp_factory(settings, handler)

    def tracked_smtp():  # type: ignore[no-untyped-def]
        protocol = make_smtp()
        connections.add(protocol)
        return protocol

    address = settings.smtp.listen_address
    server = await asyncio.get_running_loop().create_server(tracked_smtp, host=address.host, port=address.port,
                                                            reuse_address=True)
    return Listener(server, handler, connections)


def serve(settings: Settings) -> int:
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    wake_processor = context.Event()
    stop_worker = context.Event()
    engine = make_engine(settings.database_url, settings.database.busy_timeout, checkpoint_on_commit=False)
    create_schema(engine)
    committer = GroupCommitter(engine, on_commit=wake_processor.set, wal_limit=WAL_LIMIT)
    listener = await start_listener(settings, committer)
    handler, server = listener.handler, listener.server
    bound = listener.bound
    worker = _start_worker(context, settings, wake_processor, stop_worker)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("event=listening address=%s pid=%d", bound, os.getpid())
    sd_notify(f"READY=1\nSTATUS=listening on {bound}\nMAINPID={os.getpid()}")

    interval = watchdog_interval() or 5.0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except asyncio.TimeoutError:
            pass
        sd_notify("WATCHDOG=1")
        if not stop.is_set() and not worker.is_alive():
            log.error("event=worker-died exitcode=%s", worker.exitcode)
            await asyncio.sleep(_WORKER_RESTART_DELAY)
            worker = _start_worker(context, settings, wake_processor, stop_worker)

    log.info("event=stopping")
    sd_notify("STOPPING=1\nSTATUS=stopping")
    grace = settings.service.shutdown_grace
    server.close()  # no new connections
    try:
        await asyncio.wait_for(handler.idle.wait(), timeout=grace)  # in-flight DATA gets its answer
    except asyncio.TimeoutError:
        log.warning("event=shutdown-grace-expired in_flight=%d", handler.in_flight)
    await listener.close_connections()
    await asyncio.to_thread(committer.close)
    stop_worker.set()
    wake_processor.set()
    await asyncio.to_thread(worker.join, grace)
    if worker.is_alive():
        log.warning("event=worker-kill reason=grace-expired")
        worker.terminate()
        await asyncio.to_thread(worker.join, 5)
    log.info("event=stopped")
    return 0


def _start_worker(context, settings: Settings, wake: ProcessEvent, stop: ProcessEvent):  # type: ignore[no-untyped-def]
    worker = context.Process(
        target=worker_main,
        name="intake-worker",
        args=(str(settings.config_path) if settings.config_path else None, wake, stop, os.getpid()),
    )
    worker.start()
    log.info("event=worker-started pid=%d", worker.pid)
    return worker


def worker_main(config_path: str | None, wake: ProcessEvent, stop: ProcessEvent, parent_pid: int) -> None:
    """Entry point of the worker process: processor and outbox until told to stop."""
    # The parent coordinates shutdown; a terminal's Ctrl-C reaches us too and must not cut a batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _yield_cpu_to_listener()
    configure_logging()
    settings = load_settings(Path(config_path) if config_path else None)
    asyncio.run(_work(settings, wake, stop, parent_pid))


def _yield_cpu_to_listener() -> None:
    """Lower this process's CPU priority, before it starts any thread (threads inherit it).

    The listener and the worker share the machine's cores; when both want one, the listener's
    250s should not wait behind processing, which catches up as soon as the listener is quiet.
    Nice 19, and on Linux the batch policy too (waking up, we do not preempt the listener). Unlike
    the idle policy, this keeps a share of the CPU under any other load, so processing never
    stops altogether."""
    os.nice(19)
    if hasattr(os, "SCHED_BATCH"):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


class _SenderPacing:
    """Tells the outbox sender when to run: woken once mail was queued and the processor has
    caught up; held back (see :meth:`OutboxSender.run`) while its batches come back full."""

    def __init__(self, batch_size: int):
        self.wake = asyncio.Event()
        self.backlog = asyncio.Event()
        self._batch_size = batch_size
        self._queued = False  # mail queued since the sender was last woken

    def after(self, result: processor.BatchResult) -> None:
        if result.handled >= self._batch_size:  # a full batch: more mail is waiting to be acted on
            self.backlog.set()
        else:
            self.backlog.clear()
        self._queued |= bool(result.tickets_opened)
        if self._queued and not self.backlog.is_set():
            self.wake.set()
            self._queued = False


def _process_batch(engine: Engine, settings: Settings) -> processor.BatchResult:
    """One batch, then a checkpoint: the worker copies the WAL into the database file, so that no
    commit in front of a 250 has to (see :func:`intake.db.make_engine`)."""
    result = processor.process_batch(engine, settings, datetime.now(timezone.utc))
    checkpoint(engine)
    return result


async def _work(settings: Settings, wake: ProcessEvent, stop_flag: ProcessEvent, parent_pid: int) -> None:
    engine = make_engine(settings.database_url, settings.database.busy_timeout, checkpoint_on_commit=False)
    stop = asyncio.Event()
    pacing = _SenderPacing(settings.processing.batch_size)
    sender = OutboxSender(engine, settings, make_transport(settings))
    sending = asyncio.create_task(sender.run(stop, pacing.wake, busy=pacing.backlog))
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
            if result.handled:
                continue
        await asyncio.to_thread(wake.wait, poll)
        wake.clear()
    stop.set()
    pacing.wake.set()
    await sending
    engine.dispose()
