"""``intake serve``: the listener in this process; the processor, the outbox and the scheduler
(SLA sweep, digests) in a worker process (:mod:`intake.run.worker`), which this module starts but
never imports itself: each process holds only the modules it runs.

Why two processes: accepting mail (aiosmtpd's event loop plus the group-commit writer) and
processing it (MIME parsing, ORM writes, rendering) are both CPU-bound Python; under one GIL
they slow each other down. The worker shares nothing with the listener but the database, so
it can also crash or restart without touching a single accepted message.

Accepting comes first: the worker runs at a lower CPU priority than the listener, its parse
helper at the lowest (see :func:`intake.run.worker._yield_cpu_to_listener`); the worker writes in
short transactions (``processing.messages_per_transaction``), so the listener's commits never
wait long for the lock; it (not a commit in front of a 250) copies the SQLite WAL into the
database file; and its outbox sender holds back while there is a backlog of mail to act on. The
listener checkpoints only when the WAL outgrows ``db.WAL_LIMIT`` (the worker is down, or load
never lets the WAL start over).

systemd integration: the listening sockets of ``intake.socket`` when systemd passes them
(socket activation: port 25 without any capability), else ``smtp.listen``; ``READY=1`` once the
listener is up, ``WATCHDOG=1`` from the event loop (a stuck loop stops the pings and systemd
restarts us; so does a commit thread stuck past ``smtp.store_timeout``, see
:class:`intake.run.metrics.StoreWatch`: what it held got 451, never a 250, and is sent again),
``STOPPING=1`` on SIGTERM. A clean stop closes the listening socket, lets in-flight DATA
commits finish, flushes the writer, lets the worker finish its batch, and exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import socket
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from multiprocessing.connection import Connection

from sqlalchemy import Engine

from intake import openpgp
from intake.config import production
from intake.config.sections import HostPort
from intake.config.settings import EXIT_CONFIG, ConfigError, Settings, load_settings
from intake.processes import main_left_alone, return_large_buffers
from intake.receive import fetch
from intake.receive.listener import IntakeHandler, smtp_factory
from intake.run import metrics
from intake.run.process_flag import ProcessFlag
from intake.sla import deadlines
from intake.store import audit, audit_verify, key_rotation, schema, sealing
from intake.store.db import WAL_LIMIT, make_engine
from intake.store.group_commit import GroupCommitter

log = logging.getLogger(__name__)

_WORKER_RESTART_DELAY = 1.0
_SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at file descriptor 3


def sd_notify(state: str) -> bool:
    """Send *state* to systemd's notify socket, if there is one (sd_notify(3) protocol)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    # Non-blocking: this runs on the event loop, and a notify socket nobody drains (its queue holds
    # only ten datagrams by default) must cost us a lost ping, never a frozen loop.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
        try:
            sock.connect(address)
            sock.send(state.encode())
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


def inherited_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process (socket activation, sd_listen_fds(3)).

    Empty unless ``LISTEN_PID`` is our pid. The variables are removed so that the worker, which
    inherits our environment, never takes them for its own; the sockets are not inherited either.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sockets = []
    for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(f"file descriptor {fd} from systemd is not a listening stream socket "
                          "(intake.socket must use ListenStream=)")
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


def passed_socket_addresses() -> list[str]:
    """Where the sockets systemd passes this process listen ("host:port"), without taking them:
    what `intake check-config` reports under socket activation."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    addresses = []
    for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + int(os.environ.get("LISTEN_FDS", "0"))):
        sock = socket.socket(fileno=fd)
        try:
            host, port = sock.getsockname()[:2]
        finally:
            sock.detach()  # the descriptor stays open, for the process that serves on it
        addresses.append(str(HostPort(host, port)))
    return addresses


class Listener:
    """The SMTP listener's servers (one per listening socket) and the connections they have open."""

    def __init__(self, servers: list[asyncio.Server], handler: IntakeHandler, connections: weakref.WeakSet):
        self.servers = servers
        self.handler = handler
        self._connections = connections

    @property
    def port(self) -> int:
        return self.servers[0].sockets[0].getsockname()[1]

    @property
    def bound(self) -> str:
        return ", ".join(str(s.getsockname()[:2]) for server in self.servers for s in server.sockets)

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    async def close_connections(self) -> None:
        self.stop_accepting()
        for protocol in list(self._connections):
            if protocol.transport is not None:
                protocol.transport.close()
        for server in self.servers:
            await server.wait_closed()


async def start_listener(settings: Settings, committer: GroupCommitter,
                         sockets: list[socket.socket] | None = None) -> Listener:
    """Serve SMTP on *sockets* (from systemd) if given, else bind ``smtp.listen`` (port 0 picks a free port)."""
    handler = IntakeHandler(settings, committer)
    connections: weakref.WeakSet = weakref.WeakSet()
    make_smtp = smtp_factory(settings, handler)

    def tracked_smtp():  # type: ignore[no-untyped-def]
        protocol = make_smtp()
        connections.add(protocol)
        return protocol

    loop = asyncio.get_running_loop()
    if sockets:
        servers = [await loop.create_server(tracked_smtp, sock=sock) for sock in sockets]
    else:
        address = settings.smtp.listen_address
        servers = [await loop.create_server(tracked_smtp, host=address.host, port=address.port, reuse_address=True)]
    return Listener(servers, handler, connections)


def serve(settings: Settings) -> int:
    return_large_buffers()  # the listener's: whole messages too, held as they come
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    # Not multiprocessing.Event: its set() waits for a killed worker for ever (see process_flag).
    wake_processor = ProcessFlag(context)
    stop_worker = ProcessFlag(context)
    # key_warning also takes [audit] key_file for this process (a key it cannot read stops it here).
    for warning in production.warnings(settings) + list(filter(None, [audit.key_warning(settings)])):
        log.warning("event=config-warning detail=%r", warning)
    try:
        keyring = key_rotation.storage_keyring(settings)
    except ConfigError as exc:
        log.error("event=config-error error=%r", str(exc))
        return EXIT_CONFIG
    try:  # an unusable key would leave every encrypted report unread: refuse to start
        log.info("event=openpgp detail=%r", openpgp.check(settings) or "off")
    except ConfigError as exc:
        log.error("event=config-error error=%r", str(exc))
        return EXIT_CONFIG
    engine = sealing.attach(make_engine(settings.database_url, settings.database.busy_timeout,
                                        checkpoint_on_commit=False), keyring)
    # Before the listener: mail is accepted only into a database at head. Under a lock, so
    # nodes starting together migrate once (see intake.store.schema).
    try:
        brought_up = deadlines.upgrade_and_backfill(engine, settings, datetime.now(timezone.utc))
    except schema.SchemaRefused as exc:
        # A restart cannot help: 78 keeps systemd from looping (RestartPreventExitStatus).
        log.error("event=schema-refused error=%r", str(exc))
        return EXIT_CONFIG
    try:  # before the listener too: never a plaintext write into sealed storage, nor a key that does not open it
        key_rotation.check(engine, keyring)
    except sealing.SealingError as exc:
        log.error("event=storage-key-refused error=%r", str(exc))
        return EXIT_CONFIG
    upgraded, filled = brought_up.upgraded, brought_up.filled
    if upgraded.before != upgraded.after or upgraded.stamped:
        log.info("event=schema-upgraded before=%s after=%s stamped=%s", upgraded.before, upgraded.after,
                 upgraded.stamped)
    if filled and (filled.tickets or filled.errors):
        log.info("event=deadlines-backfilled tickets=%d errors=%d", filled.tickets, len(filled.errors))
    # Events from before the audit chain sealed now, not in the first transaction of new mail.
    sealed = audit_verify.start(engine, datetime.now(timezone.utc))
    if sealed:
        log.info("event=audit-chain-started sealed=%d", sealed)
    committer = GroupCommitter(engine, on_commit=wake_processor.set, wal_limit=WAL_LIMIT)
    store_watch = metrics.StoreWatch(committer.stalled, settings.smtp.store_timeout)
    activated = inherited_sockets()
    if activated:
        log.info("event=socket-activation sockets=%d note=smtp.listen-not-used", len(activated))
    listener = await start_listener(settings, committer, activated)
    handler = listener.handler
    bound = listener.bound
    worker = _start_worker(context, settings, wake_processor, stop_worker)
    # [[fetch]] sources: a thread each, storing as the listener does and waking the processor.
    fetchers = fetch.Fetchers(settings, engine, lambda count: wake_processor.set())
    metrics_server = _start_metrics(settings, engine, listener, lambda: worker.is_alive(),
                                    lambda: {state.name: state.check() for state in fetchers.states}, store_watch)
    stop, reload, woken = asyncio.Event(), asyncio.Event(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: (stop.set(), woken.set()))
    loop.add_signal_handler(signal.SIGHUP, lambda: (reload.set(), woken.set()))
    # What start-up made (modules, the ORM's and the settings' objects: most of this process's
    # objects) lives as long as the process: the collector need not look through it again each
    # time mail's short-lived objects make it run (that was 8 % of the listener's CPU per message).
    gc.freeze()
    log.info("event=listening address=%s pid=%d", bound, os.getpid())
    sd_notify(f"READY=1\nSTATUS=listening on {bound}\nMAINPID={os.getpid()}")

    interval = watchdog_interval() or 5.0
    while not stop.is_set():
        try:
            await asyncio.wait_for(woken.wait(), timeout=interval)
        except asyncio.TimeoutError:
            pass
        woken.clear()
        if reload.is_set() and not stop.is_set():
            reload.clear()
            settings, worker = await _reload(settings, handler, fetchers, worker, context, wake_processor,
                                             stop_worker)
            store_watch.timeout = settings.smtp.store_timeout
        if not store_watch.check():  # stuck: no pings, and systemd restarts us after WatchdogSec
            sd_notify("WATCHDOG=1")
        if not stop.is_set() and not worker.is_alive():
            log.error("event=worker-died exitcode=%s", worker.exitcode)
            metrics.WORKER_RESTARTS.inc()
            await asyncio.sleep(_WORKER_RESTART_DELAY)
            worker = _start_worker(context, settings, wake_processor, stop_worker)

    log.info("event=stopping")
    sd_notify("STOPPING=1\nSTATUS=stopping")
    grace = settings.service.shutdown_grace
    listener.stop_accepting()
    try:
        await asyncio.wait_for(handler.idle.wait(), timeout=grace)  # in-flight DATA gets its answer
    except asyncio.TimeoutError:
        log.warning("event=shutdown-grace-expired in_flight=%d", handler.in_flight)
    await listener.close_connections()
    await asyncio.to_thread(fetchers.stop, grace)
    if not await asyncio.to_thread(committer.close, grace):
        log.warning("event=commit-thread-stuck-at-stop stalled_s=%.0f", committer.stalled())
    stop_worker.set()
    wake_processor.set()
    await asyncio.to_thread(worker.join, grace)
    if worker.is_alive():
        log.warning("event=worker-kill reason=grace-expired")
        worker.terminate()  # its handler only asks it to stop: one waiting on a hung lock never would
        await asyncio.to_thread(worker.join, 5)
        if worker.is_alive():  # else the exit waits for it (multiprocessing joins its children)
            worker.kill()
    if metrics_server:
        await asyncio.to_thread(metrics_server.close)
    log.info("event=stopped")
    return 0


# Settings only a restart applies: the listening socket and its SMTP session options, the database,
# the service's own. Everything else is reloaded on SIGHUP.
_RESTART_ONLY = ("smtp.listen", "smtp.hostname", "smtp.max_message_size", "smtp.idle_timeout", "smtp.tls_certificate",
                 "smtp.tls_key", "smtp.require_starttls", "smtp.spool_dir", "database", "service", "logging", "metrics")


def _setting(settings: Settings, dotted: str) -> object:
    value: object = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


async def _reload(settings: Settings, handler: IntakeHandler, fetchers: fetch.Fetchers, worker, context,  # type: ignore[no-untyped-def]
                  wake: ProcessFlag, stop_worker: ProcessFlag):
    """SIGHUP: read the configuration again. If it is valid, the listener takes its addresses and
    recipient limit, the [[fetch]] sources are started, stopped or restarted as they changed, and
    the worker (processor, outbox, scheduler: policies, calendars, templates, maintainers, relay,
    schedules) is restarted on it; settings only a restart applies are named in the log. If it is
    not valid, nothing changes and the error is logged: a typo must not stop the service."""
    sd_notify("RELOADING=1\nSTATUS=reloading the configuration")
    try:
        fresh = load_settings(settings.config_path)
    except ConfigError as exc:
        log.error("event=reload-refused error=%r", str(exc).replace("\n", "; "))
        sd_notify("READY=1\nSTATUS=reload refused: configuration error (see the log)")
        return settings, worker
    handler.reconfigure(fresh)
    sources = await asyncio.to_thread(fetchers.reconfigure, fresh, settings.service.shutdown_grace)
    log.info("event=fetch-reloaded %s", " ".join(f"{kind}={','.join(names) or '-'}" for kind, names in sources.items()))
    stop_worker.set()
    wake.set()
    await asyncio.to_thread(worker.join, settings.service.shutdown_grace)
    if worker.is_alive():
        worker.terminate()
        await asyncio.to_thread(worker.join, 5)
    stop_worker.clear()
    worker = _start_worker(context, fresh, wake, stop_worker)
    pending = [name for name in _RESTART_ONLY if _setting(settings, name) != _setting(fresh, name)]
    log.info("event=reloaded restart_needed=%s", ",".join(pending) or "-")
    sd_notify("READY=1\nSTATUS=configuration reloaded")
    return fresh, worker


def _start_metrics(settings: Settings, engine: Engine, listener: Listener, worker_up: Callable[[], bool],
                   fetch_checks: Callable[[], dict[str, str]],
                   store_watch: metrics.StoreWatch) -> metrics.MetricsServer | None:
    """The /metrics, /livez and /readyz endpoint, unless disabled or its port cannot be had."""
    section = settings.metrics
    if not section.enabled:
        return None
    health = metrics.Health(asyncio.get_running_loop(), engine,
                            lambda: all(server.is_serving() for server in listener.servers), worker_up,
                            section.outbox_stuck_after, fetch_checks, store_watch)
    try:
        server = metrics.MetricsServer(section, metrics.build_registry(engine), health)
    except OSError as exc:
        # Accepting mail matters more than being watched: go on, loudly (the scraper sees us down).
        log.error("event=metrics-unavailable listen=%s error=%r", section.listen, exc)
        return None
    log.info("event=metrics-listening address=%s", section.listen)
    return server


def _start_worker(context, settings: Settings, wake: ProcessFlag, stop: ProcessFlag):  # type: ignore[no-untyped-def]
    channel = metrics.WorkerChannel(context) if settings.metrics.enabled else None
    worker = context.Process(
        target=_worker_process,
        name="intake-worker",
        args=(str(settings.config_path) if settings.config_path else None, wake, stop, os.getpid(),
              channel.writer if channel else None),
    )
    with main_left_alone():
        worker.start()
    if channel:
        channel.started()
    log.info("event=worker-started pid=%d", worker.pid)
    return worker


def _worker_process(config_path: str | None, wake: ProcessFlag, stop: ProcessFlag, parent_pid: int,
                    metrics_pipe: Connection | None) -> None:
    """The worker process's entry point. Its module (the processor, the outbox, the scheduler and
    all they use: the parse stack, routing, the composer) is imported here, in the worker only:
    the listener never runs any of it, and held it for nothing (10 MB of its idle RSS)."""
    from intake.run import worker

    worker.worker_main(config_path, wake, stop, parent_pid, metrics_pipe)
