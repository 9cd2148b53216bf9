"""The SMTP listener (aiosmtpd): accept mail for our addresses only, store it, then say 250.

It never parses or decides anything. RCPT is checked against the configured addresses and
their ``+tag`` forms (550 5.1.1 otherwise; we never relay); DATA is committed to the raw store
before the reply, so ``250`` means the message is on disk. A failed commit, or none within
``smtp.store_timeout``, answers ``451`` and the client keeps the message and retries.
Connections beyond ``smtp.max_connections`` in all, ``smtp.max_connections_per_ip`` from one
client address, or ``smtp.max_connections_per_network`` from one client network (a /24 of
IPv4, a /64 of IPv6 by default), get ``421`` and are closed at once (RFC 5321 3.8), so that a
flood or a crowd of slow-loris clients cannot take every slot.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from intake.config.sections import minimum_tls_version
from intake.config.settings import Settings, base_address
from intake.receive import addresses, spool, xforward
from intake.receive.data import SpooledData
from intake.receive.trace import Hop, trace_fields
from intake.run import metrics
from intake.store.group_commit import GroupCommitter, StoreTimeout
from intake.store.inbound import Arrival

log = logging.getLogger(__name__)


class ConnectionLimits:
    """Connections open now, in all, by client address and by client network, against the
    configured limits."""

    def __init__(self, most: int, most_per_ip: int, most_per_network: int, prefix_ipv4: int, prefix_ipv6: int):
        self._most, self._most_per_ip, self._most_per_network = most, most_per_ip, most_per_network
        self._prefixes = prefix_ipv4, prefix_ipv6
        self._open: Counter[Hashable] = Counter()
        self._open_networks: Counter[Hashable] = Counter()
        self.total = 0

    def admit(self, ip: str) -> str | None:
        """Count a new connection from *ip*: None, or (not counted) the limit it is over:
        ``"total"``, ``"address"`` or ``"network"``."""
        if self.total >= self._most:
            return "total"
        over = self.count_under(ip)
        if over is None:
            self.total += 1
        return over

    def release(self, ip: str) -> None:
        self.total -= 1
        self.uncount(ip)

    def admit_relay(self) -> str | None:
        """Count a new connection from a trusted relay, in the total only: None, or ``"total"``."""
        if self.total >= self._most:
            return "total"
        self.total += 1
        return None

    def release_relay(self) -> None:
        self.total -= 1

    def count_under(self, ip: str) -> str | None:
        """Count a connection already admitted (a trusted relay's) under the client *ip* it now
        speaks for: None, or (not counted) ``"address"`` or ``"network"``."""
        address, network = client_keys(ip, *self._prefixes)
        if self._open[address] >= self._most_per_ip:
            return "address"
        if self._open_networks[network] >= self._most_per_network:
            return "network"
        self._open[address] += 1
        self._open_networks[network] += 1
        return None

    def uncount(self, ip: str) -> None:
        """Undo :meth:`count_under` (or the per-client part of :meth:`admit`)."""
        address, network = client_keys(ip, *self._prefixes)
        for counter, key in ((self._open, address), (self._open_networks, network)):
            counter[key] -= 1
            if not counter[key]:
                del counter[key]


def client_keys(ip: str, prefix_ipv4: int, prefix_ipv6: int) -> tuple[Hashable, Hashable]:
    """The address and the network a client at *ip* is counted under, as opaque keys: an
    IPv4-mapped IPv6 address (a dual-stack listener's IPv4 client) counts as the IPv4 address, and
    its network is the /prefix_ipv4 or /prefix_ipv6 around it. Anything that is not an IP address
    is its own address and network. (inet_pton and integers: ``ipaddress`` took 70 µs an IPv6
    address, a tenth of what a connection costs the listener.)"""
    host = ip.partition("%")[0]  # without an IPv6 zone ("fe80::1%eth0")
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except (OSError, ValueError):
        return ip, ip
    if packed[:12] == _IPV4_MAPPED:
        packed = packed[12:]
    bits = 8 * len(packed)
    return packed, (bits, int.from_bytes(packed, "big") >> (bits - (prefix_ipv4 if bits == 32 else prefix_ipv6)))


_IPV4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96 (RFC 4291 2.5.5.2)


class IntakeHandler:
    """aiosmtpd handler hooks; each returns the SMTP reply line."""

    def __init__(self, settings: Settings, committer: GroupCommitter):
        self.reconfigure(settings)
        self._committer = committer
        smtp = settings.smtp
        self._hostname = settings.hostname  # as in the greeting: only a restart changes it
        self.limits = ConnectionLimits(smtp.max_connections, smtp.max_connections_per_ip,
                                       smtp.max_connections_per_network, smtp.network_prefix_ipv4,
                                       smtp.network_prefix_ipv6)
        self.memory = spool.MemoryBudget(smtp.memory_budget_bytes)
        self.spool_dir = settings.resolve_path(smtp.spool_dir) if smtp.spool_dir is not None else None
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def __dir__(self) -> list[str]:
        return _discoverable_names(type(self))  # as IntakeSMTP.__dir__: aiosmtpd lists us per connection

    def reconfigure(self, settings: Settings) -> None:
        """Take the addresses and recipient limit of reloaded *settings* (SIGHUP), for the next RCPT,
        the store's time limit, for the next DATA, and the trusted relays, for the next connection."""
        self._addresses = frozenset(settings.smtp.addresses)
        self._max_recipients = settings.smtp.max_recipients
        self._store_timeout = settings.smtp.store_timeout
        if hasattr(self, "memory"):  # a reload: the next DATA is held to the new budget
            self.memory.limit = settings.smtp.memory_budget_bytes
        self.trusted_relays = xforward.TrustedRelays(settings.smtp.trusted_relays)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if "@" not in address or base_address(address) not in self._addresses:
            log.info("event=rcpt-refused peer=%s rcpt=%r", session.peer, address[:320])
            metrics.received("rejected-recipient")
            return "550 5.1.1 Recipient address rejected: not a mailbox of this service"
        if len(envelope.rcpt_tos) >= self._max_recipients:
            metrics.received("too-many-recipients")
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: IntakeSMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        received_at = datetime.now(timezone.utc)
        mail_from = _text(envelope.mail_from) if envelope.mail_from not in (None, "<>") else ""
        origin = server.origin()
        trace_id = secrets.token_hex(6).upper()
        arrival = Arrival(
            mail_from=mail_from,
            rcpt_tos=[_text(rcpt) for rcpt in envelope.rcpt_tos],
            peer=origin.peer,
            helo=_text(origin.helo[:255]),
            raw=raw,
            received_at=received_at,
            relay=origin.relay,
            trace=trace_fields(mail_from=mail_from, rcpt_tos=envelope.rcpt_tos, client=origin.client,
                               relay=origin.via, by=self._hostname, extended=session.extended_smtp,
                               authenticated=bool(session.authenticated), tls=server.tls(),
                               trace_id=trace_id, at=received_at),
        )
        self.in_flight += 1
        self.idle.clear()
        try:
            with server.working():
                stored_id = await self._committer.store(arrival, self._store_timeout)
        except Exception as exc:  # noqa: BLE001 - any storage failure is a temporary one for the client
            result = "store-timeout" if isinstance(exc, StoreTimeout) else "store-failed"
            log.error("event=%s peer=%s size=%d error=%r", result, arrival.peer, len(raw), exc)
            metrics.received(result)
            return "451 4.3.0 Requested action aborted: local error in processing, try again later"
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()
        log.info("event=accepted inbound_id=%d peer=%s relay=%s size=%d rcpts=%d trace_id=%s", stored_id,
                 arrival.peer, arrival.relay or "-", len(raw), len(arrival.rcpt_tos), trace_id)
        metrics.received("accepted")
        return f"250 2.0.0 OK queued as {stored_id}"


@dataclass(frozen=True)
class Origin:
    """Who a message comes from: *peer* and *helo* as recorded (the original client when a trusted
    relay named it), *relay* the trusted relay's peer ("" for a direct client), and the hops of
    its ``Received:`` field: *client*, and *via* the relay when the client is another host."""

    peer: str
    helo: str
    relay: str
    client: Hop
    via: Hop | None


class IntakeSMTP(SpooledData, SMTP):
    """aiosmtpd's SMTP with ``timeout`` meaning what ``smtp.idle_timeout`` promises: seconds of silence.

    aiosmtpd restarts its idle timer only when a whole command arrives, so everything after DATA
    (the upload, then our commit) had to finish within one timeout of the DATA command: a large
    message over a slow link was cut off mid-upload, and a commit that waited on a database lock
    for longer than the timeout lost its 250 after the message was stored (the client then sends
    it again). Here any byte from the client restarts the timer, and the timer stops while we make
    the client wait. (``_reset_timeout``, ``_timeout_handle`` and ``_timeout_cb`` are aiosmtpd
    internals, 1.4.x; the idle-timeout tests hold them to this.)
    """

    _working = False
    _admitted: str | None = None  # the client's address (counted under it, but a trusted relay's: in the total only)
    _idle_deadline = 0.0  # loop time at which the client has been silent too long
    _timed_out = False
    relay: str | None = None  # the address of the trusted relay this connection comes from
    forwarded: xforward.Forwarded | None = None  # what XFORWARD said in this transaction
    _counted_as: str | None = None  # the forwarded client a relay's connection is counted under now
    _offer_xforward = False  # this EHLO answer is to a trusted relay: it gets XFORWARD
    _ehlo_lines: list[str] | None = None  # the EHLO answer's lines so far, sent with its last one

    def __dir__(self) -> list[str]:
        # aiosmtpd finds its command and AUTH methods by listing every attribute of every new
        # connection (inspect.getmembers, dir): with a connection per message that was a tenth of
        # the listener's CPU. What it looks for is fixed per class, so only that is listed.
        return _discoverable_names(type(self))

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # MAIL, RCPT (and VRFY): the usual <local@domain> without aiosmtpd's header parser (see
        # intake.receive.addresses), anything else through it.
        return addresses.simple(arg, self.local_part_limit) or super()._getaddr(arg)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # a new connection (after STARTTLS this is called again)
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) else str(peer)
            limits, trusted = self.event_handler.limits, self.event_handler.trusted_relays
            relay = bool(trusted) and ip in trusted  # a relay is held to the total; its clients to the rest
            over = limits.admit_relay() if relay else limits.admit(ip)
            if over is not None:
                log.warning("event=connection-refused peer=%s reason=too-many-connections limit=%s open=%d", ip, over,
                            limits.total)
                transport.write(_REFUSALS[over])
                transport.close()
                return
            self._admitted = ip
            if relay:
                self.relay = ip
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted is None:
            return  # refused in connection_made: aiosmtpd never set this connection up
        limits = self.event_handler.limits
        if self.relay is None:
            limits.release(self._admitted)
        else:
            self._count_as(None)
            limits.release_relay()
        self._admitted = None
        super().connection_lost(error)

    def push(self, status: str | bytes) -> Awaitable[None]:
        # aiosmtpd checks the size itself (SIZE= at MAIL, then DATA past the limit): its 552s are ours to count.
        # (Not a coroutine of its own: every reply passes here, and aiosmtpd's push is awaited as it is.)
        if status[:3] in ("552", b"552"):
            metrics.received("too-big")
        elif self._ehlo_lines is not None and isinstance(status, str):
            # aiosmtpd pushes the EHLO answer a line at a time: one write (one TCP segment) each.
            if status.startswith("250-"):
                self._ehlo_lines.append(status)
                return _HELD
            if self._offer_xforward and status == "250 HELP":  # the last line of the EHLO answer
                self._offer_xforward = False
                status = f"250-{xforward.EHLO_KEYWORD}\r\n{status}"
            status = "\r\n".join([*self._ehlo_lines, status])
            self._ehlo_lines = None
        return super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        # XFORWARD is added to aiosmtpd's answer as it is pushed: its EHLO hook would cost every
        # connection an inspect.signature() (aiosmtpd checks the hook's arity per connection).
        self._offer_xforward = self.relay is not None and bool(hostname)
        self._ehlo_lines = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._ehlo_lines = None

    @syntax("XFORWARD attribute=value ...", when="relay")
    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if self.relay is None:
            log.info("event=xforward-refused peer=%s", self._admitted)
            await self.push("550 5.7.0 XFORWARD not permitted")
            return
        if await self.check_helo_needed("EHLO"):
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        try:
            forwarded = xforward.update(self.forwarded or xforward.Forwarded(), arg)
        except xforward.BadXforward as exc:
            log.info("event=xforward-refused peer=%s reason=%r", self._admitted, str(exc))
            await self.push(f"501 5.5.4 {exc}")
            return
        over = self._count_as(forwarded.addr)
        if over is not None:
            # Postfix defers the message on a 421 and tries again later: the client's limit holds.
            log.warning("event=connection-refused peer=%s relay=%s reason=too-many-connections limit=%s",
                        forwarded.addr, self.relay, over)
            await self.push(_REFUSALS[over].decode().rstrip())
            assert self.transport is not None
            self.transport.close()
            return
        self.forwarded = forwarded
        await self.push("250 2.0.0 Ok")

    def _count_as(self, ip: str | None) -> str | None:
        """Count this relay connection under the client *ip* (None: under none), releasing the
        client it was counted under; returns the limit *ip* is over, if it is (then under none)."""
        if ip == self._counted_as:
            return None
        limits = self.event_handler.limits
        if self._counted_as is not None:
            limits.uncount(self._counted_as)
            self._counted_as = None
        if ip is None:
            return None
        over = limits.count_under(ip)
        if over is None:
            self._counted_as = ip
        return over

    def _set_post_data_state(self) -> None:
        # The end of a transaction (and RSET, EHLO, STARTTLS): what XFORWARD said ends with it.
        super()._set_post_data_state()
        if self.forwarded is not None:
            self.forwarded = None
            self._count_as(None)

    def origin(self) -> Origin:
        """Who the message of this transaction comes from (see :class:`Origin`)."""
        session = self.session
        assert session is not None
        peer, own = _peer(session), Hop(session.host_name or "", self._admitted or "")
        if self.relay is None:
            return Origin(peer, own.helo, "", own, None)
        forwarded = self.forwarded or xforward.Forwarded()
        if forwarded.addr is None:  # the relay did not say who: it is the client we know
            return Origin(peer, forwarded.helo or own.helo, peer, own, None)
        client = Hop(forwarded.helo or "", forwarded.addr, forwarded.name)
        return Origin(forwarded.peer or forwarded.addr, client.helo, peer, client, own)

    def tls(self) -> ssl.SSLObject | None:
        """The TLS session this connection switched to with STARTTLS, if it did."""
        if self.session is None or self.session.ssl is None or self.transport is None:
            return None
        return self.transport.get_extra_info("ssl_object")

    def data_received(self, data: bytes) -> None:
        if not self._working:
            self._reset_timeout()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Called for every command and every chunk of data: moving the deadline is cheaper than
        # cancelling a timer and scheduling another each time. A timer that fires before the
        # deadline sets itself again for it (see _idle_timer).
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or self._timed_out or self._idle_deadline < handle.when():
            if handle is not None:
                handle.cancel()
            self._timed_out = False
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer)

    def _idle_timer(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer)
            return
        self._timed_out = True
        self._timeout_cb()

    @contextmanager
    def working(self) -> Iterator[None]:
        """No idle timeout while the client waits for our answer."""
        self._working = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            yield
        finally:
            self._working = False
            if self.transport is not None:  # not after connection_lost: the timer would fire on nothing
                self._reset_timeout()


class _Held:
    """What :meth:`IntakeSMTP.push` answers for a line it holds back: nothing to wait for."""

    def __await__(self) -> Iterator[None]:
        return iter(())


_HELD = _Held()

_REFUSALS = {
    "total": b"421 4.7.0 Too many connections, try again later\r\n",
    "address": b"421 4.7.0 Too many connections, try again later\r\n",
    "network": b"421 4.7.0 Too many connections from your network\r\n",
}


@functools.cache
def _discoverable_names(cls: type) -> list[str]:
    """The attributes of *cls* aiosmtpd looks up by listing them: the protocol's ``smtp_*``
    commands, the handler's ``handle_*`` hooks and both's ``auth_*`` mechanisms."""
    return [name for name in dir(cls) if name.startswith(("smtp_", "handle_", "auth_"))]


def _text(value: str) -> str:
    """A command argument as text the database takes: aiosmtpd keeps bytes that are not UTF-8 as
    lone surrogates (surrogateescape), which no database encodes (every commit failed: 451 for
    ever). They become U+FFFD, as everywhere else intake reads text it did not write."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _peer(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    smtp = settings.smtp
    if smtp.tls_certificate is None or smtp.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = minimum_tls_version(smtp.tls_min_version)
    context.load_cert_chain(settings.resolve_path(smtp.tls_certificate), settings.resolve_path(smtp.tls_key))
    return context


def smtp_factory(settings: Settings, handler: IntakeHandler):  # type: ignore[no-untyped-def]
    """A protocol factory for ``loop.create_server`` on the running loop: one aiosmtpd SMTP per connection."""
    context = tls_context(settings)
    smtp = settings.smtp
    hostname = settings.hostname  # given to each connection: aiosmtpd would look up the FQDN every time
    loop = asyncio.get_running_loop()  # given to each connection: aiosmtpd would look it up every time

    def factory() -> SMTP:
        return IntakeSMTP(
            handler,
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="intake",
            tls_context=context,
            require_starttls=smtp.require_starttls,
            timeout=smtp.idle_timeout,
            loop=loop,
        )

    return factory
