"""Fetch mail from hosted IMAP mailboxes (``[[fetch]]`` sources) into the raw store.

For an organisation whose security@ lives on a hosted service whose MX it will not move. Each
message is stored exactly as the listener stores one (an :class:`~intake.store.inbound.Arrival`,
peer ``imap:<name>``, committed), and only after the commit is it marked ``\\Seen``, moved or
deleted on the server. A crash or a dropped connection between the two leaves it unmarked: the
next pass fetches it again and finds its bytes already stored from this source (sha256), so it
is stored once and then marked; the check and the insert are one transaction under a lock per
source, so two fetchers of one mailbox (two nodes) store it once too. Messages are read with
``BODY.PEEK[]``, which sets no flag, with their ``INTERNALDATE``: when the mailbox got them,
where their SLA starts (bounded, :func:`~intake.understand.arrival_time.fetched_sla_start`).

Login with a password or an OAuth2 access token (SASL XOAUTH2 or OAUTHBEARER), read from its
file at every login. imapclient, synchronous: each source runs in a thread of its own
(:func:`run`, :class:`Fetchers`), beside the listener's event loop, never blocking it; IDLE where
the server offers it, polling otherwise, and a bounded back-off after errors.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import format_datetime, getaddresses, parseaddr

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from sqlalchemy import Engine

from intake.config.fetch import FetchSource
from intake.config.settings import Settings
from intake.run import metrics
from intake.store.inbound import Arrival, store_new_from
from intake.understand.arrival_time import fetched_sla_start

log = logging.getLogger(__name__)

BATCH = 50  # messages fetched, committed and marked together: one fsync and one STORE per batch
TIMEOUT = 60.0  # seconds any one IMAP read or write may take before the connection counts as dead
MAX_BACKOFF = 600.0  # the longest wait between tries after errors, seconds
_SEEN, _DELETED = b"\\Seen", b"\\Deleted"
_BODY, _INTERNALDATE = b"BODY[]", b"INTERNALDATE"
# What is fetched of each message: its bytes (PEEK: no \\Seen flag set) and when the mailbox got it.
_FETCH_ITEMS = [b"BODY.PEEK[]", _INTERNALDATE]
# Headers naming the address a fetched message was delivered to, most telling first.
_RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To", "To", "Cc")

# What a dead or refusing server, a bad certificate, a dropped connection or a timeout raise (the
# TLS errors and timeouts are OSErrors), and a missing password file.
FetchError = (IMAPClientError, OSError)


class TokenRejected(LoginError):
    """The server refused an OAuth2 source's access token: most often it expired because the
    refresher that rewrites the token file has stopped."""


@dataclass
class PassResult:
    """What one pass over a source did."""

    found: int = 0  # messages waiting on the server
    stored: int = 0  # newly committed
    duplicates: int = 0  # stored before (a pass that ended before marking them): marked now
    marked: int = 0  # marked seen, moved or deleted on the server
    vanished: int = 0  # gone before they could be fetched (deleted by someone else)
    too_big: int = 0  # over smtp.max_message_size: left on the server


@dataclass
class SourceState:
    """A source's health, for logs and whoever reports it: last success, last error, failures in a row."""

    name: str
    last_success: datetime | None = None
    last_error: str | None = None
    failures: int = 0
    stored: int = 0

    def check(self) -> str:
        """What /readyz says of the source: ok, or since when and why it fails."""
        if not self.failures:
            return "ok"
        since = self.last_success.isoformat() if self.last_success else "never"
        return f"failing ({self.failures} tries in a row; last success {since}): {self.last_error}"[:300]


def connect(source: FetchSource, settings: Settings) -> IMAPClient:
    """A logged-in client over verified TLS (IMAPS, or STARTTLS before anything is sent)."""
    context = ssl.create_default_context(
        cafile=str(settings.resolve_path(source.ca_file)) if source.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Read at every login: a refresher rewrites a token. (When it was written, for the error if refused.)
    written = _written(source, settings) if source.auth == "oauth2" else ""
    secret = source.credential(settings.base_dir)
    client = IMAPClient(source.host, port=source.port, ssl=source.tls == "imaps", ssl_context=context,
                        timeout=TIMEOUT)
    try:
        if source.tls == "starttls":
            client.starttls(context)
        _login(client, source, secret, written)
        if source.move_to and not client.folder_exists(source.move_to):
            client.create_folder(source.move_to)
    except BaseException:
        _close(client)
        raise
    return client


def _written(source: FetchSource, settings: Settings) -> str:
    """When the source's token file was last written (UTC, ISO 8601), or "unknown"."""
    try:
        stamp = os.stat(source.credential_path(settings.base_dir)).st_mtime
    except OSError:
        return "unknown"
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")


def _login(client: IMAPClient, source: FetchSource, secret: str, written: str) -> None:
    """LOGIN with the password, or SASL XOAUTH2/OAUTHBEARER with the access token; a refused
    token is a :class:`TokenRejected` naming the source and when its token file was written."""
    if source.auth == "password":
        client.login(source.user, secret)
        return
    try:
        if source.oauth2_mechanism == "OAUTHBEARER":
            client.oauthbearer_login(source.user, secret)
        else:
            client.oauth2_login(source.user, secret)
    except LoginError as exc:
        raise TokenRejected(f"fetch source {source.name}: token rejected ({source.oauth2_mechanism}: {exc}); "
                            f"is the refresher running? Its token file was last written {written}") from None


def fetch_once(settings: Settings, source: FetchSource, engine: Engine, *, batch: int = BATCH,
               client: IMAPClient | None = None, on_stored: Callable[[int], None] = lambda count: None,
               after_batch: Callable[[PassResult], None] | None = None,
               stop: threading.Event | None = None) -> PassResult:
    """One pass over *source*: store what waits in its folder, then mark it on the server.

    Uses *client* if given (left open), else a connection of its own. *on_stored* is told how
    many messages each commit stored (the service wakes its processor); *after_batch* is called
    after each batch is committed and marked (progress; tests drop the connection there). Once
    *stop* is set, the pass ends after the batch in hand is committed and marked."""
    own = client is None
    client = client or connect(source, settings)
    client.normalise_times = False  # INTERNALDATE with the zone the server gave, not naive local time
    result = PassResult()
    try:
        selected = client.select_folder(source.folder)
        uidvalidity = int(selected.get(b"UIDVALIDITY", 0))
        uids = sorted(client.search(["UNSEEN"] if source.after == "seen" else ["NOT", "DELETED"]))
        result.found = len(uids)
        uids = _within_size_limit(settings, source, client, uids, result)
        for chunk in _chunks(uids, batch):
            if stop is not None and stop.is_set():
                break
            _fetch_batch(settings, source, engine, client, uidvalidity, chunk, result, on_stored)
            if after_batch is not None:
                after_batch(result)
    finally:
        if own:
            _close(client)
    return result


def _within_size_limit(settings: Settings, source: FetchSource, client: IMAPClient, uids: list[int],
                       result: PassResult) -> list[int]:
    """*uids* but those larger than ``smtp.max_message_size``, which the listener would refuse
    (552) too: they stay on the server, unmarked, and each pass warns about them."""
    if not uids:
        return uids
    limit = settings.smtp.max_message_size
    sizes = client.fetch(uids, [b"RFC822.SIZE"])
    too_big = [uid for uid in uids if sizes.get(uid, {}).get(b"RFC822.SIZE", 0) > limit]
    if too_big:
        result.too_big = len(too_big)
        log.warning("event=fetch-too-big source=%s messages=%d limit=%d uids=%s note=left-on-server", source.name,
                    len(too_big), limit, ",".join(map(str, too_big[:20])))
    return [uid for uid in uids if uid not in set(too_big)]


def _fetch_batch(settings: Settings, source: FetchSource, engine: Engine, client: IMAPClient, uidvalidity: int,
                 uids: list[int], result: PassResult, on_stored: Callable[[int], None]) -> None:
    """Fetch *uids*, commit the ones not stored before, then mark every one fetched."""
    fetched = _fetched(client, uids)
    result.vanished += len(uids) - len(fetched)
    now = datetime.now(timezone.utc)
    # Committed unless stored from this source before (a pass that ended before marking, another
    # node's fetcher) or repeated in the batch: stored once, marked now either way.
    ids = store_new_from(engine, source.peer, [arrival(settings, source, raw, now, uidvalidity, uid, internal_date)
                                               for uid, (raw, internal_date) in fetched.items()])
    result.duplicates += len(fetched) - len(ids)
    if ids:
        result.stored += len(ids)
        metrics.FETCH_STORED.labels(source.name).inc(len(ids))
        on_stored(len(ids))
        log.info("event=fetched source=%s stored=%d first_id=%d", source.name, len(ids), ids[0])
    done = sorted(fetched)
    if done:
        _mark(client, source, done)
        result.marked += len(done)


def _fetched(client: IMAPClient, uids: list[int]) -> dict[int, tuple[bytes, datetime | None]]:
    """The raw bytes and INTERNALDATE of *uids* that still exist. A message expunged by another
    client meanwhile is left out: the server leaves it out of the answer or (Dovecot) refuses the
    whole FETCH with NO [EXPUNGEISSUED] until this session has heard of the expunge; then a NOOP,
    and each message is asked for alone. A dropped connection is raised, not taken for a refusal."""
    try:
        answer = client.fetch(uids, _FETCH_ITEMS)
    except IMAPClientAbortError:
        raise
    except IMAPClient.Error as exc:
        log.info("event=fetch-batch-refused uids=%d error=%r: fetching one by one", len(uids), str(exc)[:200])
        client.noop()
        answer = {}
        for uid in uids:
            try:
                answer.update(client.fetch([uid], _FETCH_ITEMS))
            except IMAPClientAbortError:
                raise
            except IMAPClient.Error:
                continue
    found = {}
    for uid in uids:
        item = answer.get(uid, {})
        # Dovecot answers BODY[] NIL for a message expunged since this session last heard.
        if isinstance(item.get(_BODY), bytes):
            found[uid] = (item[_BODY], _instant(item.get(_INTERNALDATE)))
    return found


def _instant(value: object) -> datetime | None:
    """An INTERNALDATE as imapclient gives it (aware with normalise_times off; naive local time
    otherwise), as an aware UTC instant; None if the server gave none."""
    return value.astimezone(timezone.utc) if isinstance(value, datetime) else None


def _mark(client: IMAPClient, source: FetchSource, uids: list[int]) -> None:
    """Do what ``after`` says to *uids*, which are committed. UID EXPUNGE (UIDPLUS) removes only
    ours: a plain EXPUNGE would also remove what another client flagged \\Deleted."""
    if source.after == "seen":
        client.add_flags(uids, [_SEEN], silent=True)
        return
    if source.move_to and client.has_capability("MOVE"):
        client.move(uids, source.move_to)
        return
    if source.move_to:
        client.copy(uids, source.move_to)
    client.add_flags(uids, [_DELETED], silent=True)
    if client.has_capability("UIDPLUS"):
        client.uid_expunge(uids)
    else:
        client.expunge()


def arrival(settings: Settings, source: FetchSource, raw: bytes, now: datetime, uidvalidity: int,
            uid: int, internal_date: datetime | None = None) -> Arrival:
    """*raw*, fetched from *source* at *now*, as the listener would have received it: the envelope
    sender from its Return-Path (else From), the recipient the configured address it was
    delivered to (else the first configured one), and a Received: field saying where it was
    fetched from and when the mailbox got it (*internal_date*, its INTERNALDATE), where its SLA
    starts, bounded (:func:`~intake.understand.arrival_time.fetched_sla_start`)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    mail_from = parseaddr(str(headers.get("Return-Path") or headers.get("From") or ""))[1]
    recipient = _our_recipient(settings, headers)
    internal = f" internaldate {format_datetime(internal_date)}" if internal_date else ""
    received = (f"Received: from {_word(source.host)} by {_word(settings.hostname)} (intake) with IMAP\r\n"
                f"\t(fetch source {source.name} uidvalidity {uidvalidity} uid {uid}{internal})\r\n"
                f"\tfor <{recipient}>; {format_datetime(now)}\r\n")
    return Arrival(mail_from=mail_from, rcpt_tos=[recipient], peer=source.peer, helo=_word(source.host), raw=raw,
                   received_at=now, trace=received, arrived_at=fetched_sla_start(internal_date, raw, now))


def _our_recipient(settings: Settings, headers) -> str:  # type: ignore[no-untyped-def]
    for name in _RECIPIENT_HEADERS:
        values = [str(value) for value in headers.get_all(name) or []]
        for _, address in getaddresses(values):
            if "@" in address and settings.our_address(address):
                return address.lower()
    return settings.smtp.addresses[0]


def _word(text: str) -> str:
    """Operator or server text as one word of printable ASCII for a header field."""
    cleaned = "".join(c if c.isascii() and c.isprintable() and c not in " ();<>\"\\" else "?" for c in text[:255])
    return cleaned or "unknown"


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _close(client: IMAPClient) -> None:
    try:
        client.logout()
    except Exception:  # noqa: BLE001 - a dead connection cannot log out; it is closed either way
        try:
            client.shutdown()
        except Exception:  # noqa: BLE001
            pass


def backoff(failures: int, poll_interval: float) -> float:
    """Seconds to wait after *failures* failed tries in a row: doubling from 5 s, at most
    MAX_BACKOFF (and never less than the poll interval would wait)."""
    return max(poll_interval, min(MAX_BACKOFF, 5.0 * 2 ** min(failures - 1, 10)))


def run(settings: Settings, source: FetchSource, engine: Engine, stop: threading.Event,
        state: SourceState | None = None, on_stored: Callable[[int], None] = lambda count: None) -> SourceState:
    """Fetch from *source* until *stop* is set: a pass, then IDLE (or a poll interval's wait)
    until the server says something changed; after an error, a bounded back-off and a new
    connection. Meant for a thread of its own."""
    state = state or SourceState(source.name)
    client: IMAPClient | None = None
    while not stop.is_set():
        try:
            if client is None:
                client = connect(source, settings)
            result = fetch_once(settings, source, engine, client=client, on_stored=on_stored, stop=stop)
            state.stored += result.stored
            state.last_success, state.failures, state.last_error = datetime.now(timezone.utc), 0, None
            metrics.fetch_pass(source.name, state.last_success, ok=True)
            _wait_for_news(client, source, stop)
        except FetchError as exc:
            state.failures += 1
            state.last_error = f"{type(exc).__name__}: {exc}"[:500]
            delay = backoff(state.failures, source.poll_interval)
            metrics.fetch_pass(source.name, None, ok=False)
            log.warning("event=fetch-failed source=%s failures=%d retry_in=%.0f error=%r", source.name,
                        state.failures, delay, state.last_error)
            if client is not None:
                _close(client)
                client = None
            stop.wait(delay)
    if client is not None:
        _close(client)
    return state


@dataclass
class _Running:
    """One source's fetch thread, and the event that stops it."""

    source: FetchSource
    state: SourceState
    stop: threading.Event
    thread: threading.Thread


class Fetchers:
    """The service's fetch threads, one per source. :meth:`reconfigure` applies a reloaded
    configuration (SIGHUP); :meth:`stop` ends them all."""

    def __init__(self, settings: Settings, engine: Engine, on_stored: Callable[[int], None]):
        self._settings, self._engine, self._on_stored = settings, engine, on_stored
        self._running: dict[str, _Running] = {}
        for source in settings.fetch:
            self._start(source)

    @property
    def states(self) -> list[SourceState]:
        """The running sources' states, in configuration order."""
        return [running.state for running in self._running.values()]

    def _start(self, source: FetchSource) -> None:
        for metric in (metrics.FETCH_STORED, metrics.FETCH_LAST_SUCCESS, metrics.FETCH_FAILURES):
            metric.labels(source.name)  # every series there, at zero, from the start
        state, stop = SourceState(source.name), threading.Event()
        thread = threading.Thread(target=run, args=(self._settings, source, self._engine, stop, state,
                                                    self._on_stored), name=f"fetch-{source.name}", daemon=True)
        self._running[source.name] = _Running(source, state, stop, thread)
        thread.start()

    def reconfigure(self, settings: Settings, timeout: float) -> dict[str, list[str]]:
        """Apply *settings*' sources: a new one starts, a removed one stops (once the batch in
        hand is committed and marked), a changed one, or one whose logins fail, restarts (so a
        fixed password or token file is tried at once, not after its back-off); the others go
        on undisturbed, unless what they read of the rest changed (the intake addresses a
        fetched message's recipient is one of). Returns the names of each kind, for the log."""
        wanted = {source.name: source for source in settings.fetch}
        removed = [name for name in self._running if name not in wanted]
        everything = _read_by_sources(settings) != _read_by_sources(self._settings)
        restarted = [name for name, running in self._running.items() if name in wanted and (
            everything or running.source != wanted[name] or running.state.failures)]
        stopping = [self._running.pop(name) for name in removed + restarted]
        for running in stopping:
            running.stop.set()
        for running in stopping:  # a restarted source's old session ends before its new one starts
            running.thread.join(timeout)
        for name in removed:
            for metric in (metrics.FETCH_STORED, metrics.FETCH_LAST_SUCCESS, metrics.FETCH_FAILURES):
                metric.remove(name)
        self._settings = settings
        added = [name for name in wanted if name not in self._running and name not in restarted]
        for name, source in wanted.items():
            if name not in self._running:
                self._start(source)
        self._running = {name: self._running[name] for name in wanted}  # configuration order
        return {"added": added, "removed": removed, "restarted": restarted}

    def stop(self, timeout: float) -> None:
        for running in self._running.values():
            running.stop.set()
        for running in self._running.values():  # each notices within a second (IDLE is checked every second)
            running.thread.join(timeout)


def _read_by_sources(settings: Settings) -> tuple[object, ...]:
    """What a source's thread reads of the settings besides its own [[fetch]] table (the rest,
    hostname and message size, a restart applies)."""
    return tuple(settings.smtp.addresses), settings.base_dir


def _wait_for_news(client: IMAPClient, source: FetchSource, stop: threading.Event) -> None:
    """Until new mail may be there: IDLE (checked every second, for *stop*) for at most a poll
    interval, or a plain wait where the server has no IDLE."""
    if not client.has_capability("IDLE"):
        stop.wait(source.poll_interval)
        return
    client.idle()
    try:
        waited = 0.0
        while waited < source.poll_interval and not stop.is_set():
            if client.idle_check(timeout=1):
                return
            waited += 1
    finally:
        client.idle_done()
