"""Fetch mail from hosted IMAP mailboxes (``[[fetch]]`` sources) into the raw store.

For an organisation whose security@ lives on a hosted service whose MX it will not move. Each
message is stored exactly as the listener stores one (an :class:`~intake.store.inbound.Arrival`,
peer ``imap:<name>``, committed), and only after the commit is it marked ``\\Seen``, moved or
deleted on the server. A crash or a dropped connection between the two leaves it unmarked: the
next pass fetches it again and finds its bytes already stored from this source (sha256), so it
is stored once and then marked. Messages are read with ``BODY.PEEK[]``, which sets no flag.

imapclient, synchronous: each source runs in a thread of its own (:func:`run`), beside the
listener's event loop, never blocking it; IDLE where the server offers it, polling otherwise,
and a bounded back-off after errors.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import format_datetime, getaddresses, parseaddr

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError
from sqlalchemy import Engine

from intake.config.fetch import FetchSource
from intake.config.settings import Settings
from intake.run import metrics
from intake.store import sealing
from intake.store.inbound import Arrival, store, stored_from

log = logging.getLogger(__name__)

BATCH = 50  # messages fetched, committed and marked together: one fsync and one STORE per batch
TIMEOUT = 60.0  # seconds any one IMAP read or write may take before the connection counts as dead
MAX_BACKOFF = 600.0  # the longest wait between tries after errors, seconds
_SEEN, _DELETED = b"\\Seen", b"\\Deleted"
# Headers naming the address a fetched message was delivered to, most telling first.
_RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To", "To", "Cc")

# What a dead or refusing server, a bad certificate, a dropped connection or a timeout raise (the
# TLS errors and timeouts are OSErrors), and a missing password file.
FetchError = (IMAPClientError, OSError)


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
    password = source.password(settings.base_dir)
    client = IMAPClient(source.host, port=source.port, ssl=source.tls == "imaps", ssl_context=context,
                        timeout=TIMEOUT)
    try:
        if source.tls == "starttls":
            client.starttls(context)
        client.login(source.user, password)
        if source.move_to and not client.folder_exists(source.move_to):
            client.create_folder(source.move_to)
    except BaseException:
        _close(client)
        raise
    return client


def fetch_once(settings: Settings, source: FetchSource, engine: Engine, *, batch: int = BATCH,
               client: IMAPClient | None = None, on_stored: Callable[[int], None] = lambda count: None,
               after_batch: Callable[[PassResult], None] | None = None) -> PassResult:
    """One pass over *source*: store what waits in its folder, then mark it on the server.

    Uses *client* if given (left open), else a connection of its own. *on_stored* is told how
    many messages each commit stored (the service wakes its processor); *after_batch* is called
    after each batch is committed and marked (progress; tests drop the connection there)."""
    own = client is None
    client = client or connect(source, settings)
    result = PassResult()
    try:
        selected = client.select_folder(source.folder)
        uidvalidity = int(selected.get(b"UIDVALIDITY", 0))
        uids = sorted(client.search(["UNSEEN"] if source.after == "seen" else ["NOT", "DELETED"]))
        result.found = len(uids)
        uids = _within_size_limit(settings, source, client, uids, result)
        for chunk in _chunks(uids, batch):
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
    bodies = _bodies(client, uids)
    result.vanished += len(uids) - len(bodies)
    hashes = {uid: sealing.content_digest(engine, raw) for uid, raw in bodies.items()}
    known = stored_from(engine, source.peer, hashes.values())
    now = datetime.now(timezone.utc)
    arrivals, new_hashes = [], set()
    for uid, raw in bodies.items():
        digest = hashes[uid]
        if digest in known or digest in new_hashes:  # the same bytes twice in one batch: one message
            result.duplicates += 1
            continue
        new_hashes.add(digest)
        arrivals.append(arrival(settings, source, raw, now, uidvalidity, uid))
    if arrivals:
        ids = store(engine, arrivals)
        result.stored += len(ids)
        metrics.FETCH_STORED.labels(source.name).inc(len(ids))
        on_stored(len(ids))
        log.info("event=fetched source=%s stored=%d first_id=%d", source.name, len(ids), ids[0])
    done = sorted(bodies)
    if done:
        _mark(client, source, done)
        result.marked += len(done)


def _bodies(client: IMAPClient, uids: list[int]) -> dict[int, bytes]:
    """The raw bytes of *uids* that still exist. A message expunged by another client meanwhile is
    left out: the server leaves it out of the answer or (Dovecot) refuses the whole FETCH with
    NO [EXPUNGEISSUED] until this session has heard of the expunge; then a NOOP, and each
    message is asked for alone. A dropped connection is raised, not taken for a refusal."""
    try:
        answer = client.fetch(uids, [b"BODY.PEEK[]"])
    except IMAPClientAbortError:
        raise
    except IMAPClient.Error as exc:
        log.info("event=fetch-batch-refused uids=%d error=%r: fetching one by one", len(uids), str(exc)[:200])
        client.noop()
        answer = {}
        for uid in uids:
            try:
                answer.update(client.fetch([uid], [b"BODY.PEEK[]"]))
            except IMAPClientAbortError:
                raise
            except IMAPClient.Error:
                continue
    # Dovecot answers BODY[] NIL for a message expunged since this session last heard.
    bodies = {uid: answer.get(uid, {}).get(b"BODY[]") for uid in uids}
    return {uid: raw for uid, raw in bodies.items() if isinstance(raw, bytes)}


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
            uid: int) -> Arrival:
    """*raw*, fetched from *source*, as the listener would have received it: the envelope sender
    from its Return-Path (else From), the recipient the configured address it was delivered to
    (else the first configured one), and a Received: field saying where it was fetched from."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    mail_from = parseaddr(str(headers.get("Return-Path") or headers.get("From") or ""))[1]
    recipient = _our_recipient(settings, headers)
    received = (f"Received: from {_word(source.host)} by {_word(settings.hostname)} (intake) with IMAP\r\n"
                f"\t(fetch source {source.name} uidvalidity {uidvalidity} uid {uid})\r\n"
                f"\tfor <{recipient}>; {format_datetime(now)}\r\n")
    return Arrival(mail_from=mail_from, rcpt_tos=[recipient], peer=source.peer, helo=_word(source.host), raw=raw,
                   received_at=now, trace=received)


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
            result = fetch_once(settings, source, engine, client=client, on_stored=on_stored)
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


class Fetchers:
    """The service's fetch threads, one per source; :meth:`stop` ends them all."""

    def __init__(self, settings: Settings, engine: Engine, on_stored: Callable[[int], None]):
        self._stop = threading.Event()
        self.states = [SourceState(source.name) for source in settings.fetch]
        for source in settings.fetch:  # every series there, at zero, from the start
            for metric in (metrics.FETCH_STORED, metrics.FETCH_LAST_SUCCESS, metrics.FETCH_FAILURES):
                metric.labels(source.name)
        self._threads = [
            threading.Thread(target=run, args=(settings, source, engine, self._stop, state, on_stored),
                             name=f"fetch-{source.name}", daemon=True)
            for source, state in zip(settings.fetch, self.states)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        for thread in self._threads:  # each notices within a second (IDLE is checked every second)
            thread.join(timeout)


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
