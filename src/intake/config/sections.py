"""The configuration's sections: one pydantic model per ``[section]`` table, with its checks.

:class:`intake.config.settings.Settings` puts them together and loads them; calendars and SLA
policies are :mod:`intake.sla.calendars` and :mod:`intake.sla.engine` models.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator,
)

from intake import language_tags, patterns
from intake.sla.calendars import parse_duration
from intake.vocabulary import SYSTEM_ACTOR, UID_ACTOR_PREFIX, UNIX_ACTOR_PREFIX


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _parse_host_port(value: Any) -> HostPort:
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a string 'host:port'")
    text = value.strip()
    if text.startswith("["):  # [::1]:25
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected 'host:port', got {value!r}")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    return HostPort(host, number)


def _check_host_port(value: str) -> str:
    _parse_host_port(value)
    return value


HostPortText = Annotated[str, AfterValidator(_check_host_port)]
# The oldest TLS version a connection may use (see :func:`minimum_tls_version`).
TlsVersion = Literal["1.2", "1.3"]


def minimum_tls_version(version: TlsVersion) -> ssl.TLSVersion:
    """The :mod:`ssl` value of a configured ``tls_min_version``."""
    return ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2


def _check_mailbox(value: str) -> str:
    local, sep, domain = value.rpartition("@")
    if not sep or not local or not domain or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an email address")
    return value


def _check_address(value: str) -> str:
    """An intake address: a mailbox without a +tag (its +tag forms are implied)."""
    local = _check_mailbox(value).rpartition("@")[0]
    if "+" in local:
        raise ValueError(f"{value!r}: list the base address; its +tag forms are accepted automatically")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntakeSection(Section):
    # Prefix of public ticket references: SEC-2026-0001.
    reference_prefix: str = Field(default="SEC", pattern=r"^[A-Z][A-Z0-9]{0,15}$")
    # Domain used on the right of Message-IDs of mail we send.
    message_id_domain: str = "example.com"
    # Display name on mail we send from the security address.
    from_name: str = "Security Team"
    # Policy applied to tickets unless an address or +tag maps to another one.
    default_policy: str = "vaixus"
    # Address (or +tag) -> policy name.
    policy_by_address: dict[str, str] = Field(default_factory=dict)
    # Directory of templates that override the shipped ones (same file names); <tag>/ in it holds
    # a language's (see intake.send.localised).
    templates_dir: Path | None = None
    # Languages reporters get mail in (BCP 47 tags), chosen per report from its Content-Language or
    # Accept-Language; English is always one and the fallback. More than English also fills
    # security.txt Preferred-Languages unless [security_txt] preferred_languages says otherwise.
    languages: list[str] = Field(default_factory=lambda: [language_tags.ENGLISH])
    # Low-quality scoring rules (TOML); unset: the shipped rules (intake/understand/rules/low-quality.toml).
    # Named spam_rules before: still read under that name (INTAKE_INTAKE__SPAM_RULES too), with a
    # warning from load_settings.
    quality_rules: Path | None = Field(default=None, validation_alias=AliasChoices("quality_rules", "spam_rules"))
    # Mail with Auto-Submitted: auto-generated that threads into no ticket (web forms, scanners):
    # a ticket without an automatic reply; false: held as auto-reply (see `intake messages`).
    ticket_auto_generated: bool = True
    # Mail an upstream filter flagged (X-Spam-Flag: YES): held as spam unless true (then a ticket).
    ticket_spam: bool = False
    @field_validator("languages")
    @classmethod
    def _language_tags(cls, value: list[str]) -> list[str]:
        tags = []
        for text in value:
            tag = language_tags.parse(text)
            if tag is None:
                raise ValueError(f"{text!r} is not a language tag (BCP 47: en, de, pt-BR)")
            if tag in tags:
                raise ValueError(f"{tag!r} is listed twice")
            tags.append(tag)
        if language_tags.ENGLISH not in tags:
            raise ValueError(f"{language_tags.ENGLISH!r} must be listed: English is the language of every other report")
        return tags

    # This file is a development configuration (the shipped config.toml): check-config does not warn
    # about example.com addresses, the Maildir transport, no maintainers or a HELO of localhost.
    development: bool = False


class SmtpSection(Section):
    # Address the listener binds, 'host:port'.
    listen: HostPortText = "127.0.0.1:8025"
    # Addresses we accept mail for; their +tag forms are accepted too.
    addresses: list[Annotated[str, AfterValidator(_check_address)]] = Field(
        default_factory=lambda: ["security@example.com"], min_length=1
    )
    # Name in the greeting, our Received: header and our EHLO to the relay; unset: this machine's
    # fully qualified name (Settings.hostname looks it up once per process).
    hostname: str | None = None
    # Largest message accepted, bytes (announced with SIZE; larger gets 552). 35 MiB: a 25 MB
    # attachment is ~33.3 MB after base64 and headers.
    max_message_size: int = Field(default=35 * 1024 * 1024, ge=1024)
    # Bytes of mail the listener holds at once, in all its sessions (being received, then stored;
    # storing one briefly costs 2-3x its size): DATA that would go past it gets 452 4.3.1 and the
    # client retries later, so that many large messages at once never run the service out of
    # memory. At least max_message_size; unset: twice max_message_size.
    memory_budget: int | None = Field(default=None, ge=1024)
    # Folder of the spool files of messages being received (past 1 MiB; anonymous, gone when
    # closed). Unset: the system's temporary folder (PrivateTmp under systemd).
    spool_dir: Path | None = None
    # Most recipients accepted in one transaction (more get 452).
    max_recipients: int = Field(default=20, ge=1, le=1000)
    # Seconds a client may stay idle before the connection is dropped.
    idle_timeout: float = Field(default=60.0, gt=0)
    # Seconds DATA waits for its commit before answering 451; a commit running longer makes the
    # store "stuck" (log, /readyz, metrics, no systemd watchdog pings). Under RFC 5321's 10 minutes
    # (4.5.3.2.6): a client gone before the answer would send the message again anyway.
    store_timeout: float = Field(default=60.0, gt=0, lt=600)
    # Connections open at once, in all and from one client address; more get 421 and are closed.
    max_connections: int = Field(default=200, ge=1, le=100_000)
    max_connections_per_ip: int = Field(default=50, ge=1, le=100_000)
    # ... and from one client network: the addresses sharing their first network_prefix_ipv4 bits
    # (IPv4, IPv4-mapped IPv6 included) or network_prefix_ipv6 bits. Between max_connections_per_ip
    # and max_connections; unset: 100, within those two.
    max_connections_per_network: int = Field(default=100, ge=1, le=100_000)
    network_prefix_ipv4: int = Field(default=24, ge=8, le=32)
    network_prefix_ipv6: int = Field(default=64, ge=16, le=128)
    # STARTTLS: PEM certificate chain and key; both or neither.
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    # Refuse MAIL before STARTTLS (only with a certificate).
    require_starttls: bool = False
    # Oldest TLS version a client may STARTTLS with: "1.2" or "1.3" (a policy promising TLS 1.3).
    tls_min_version: TlsVersion = "1.2"
    # MTAs in front of intake (addresses or networks, e.g. "127.0.0.1", "10.0.0.0/24"): from them
    # intake takes Postfix's XFORWARD (the original client), counts connection limits against that
    # client, and starts SLA clocks when the relay accepted the message (its Received: header).
    trusted_relays: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)

    @property
    def listen_address(self) -> HostPort:
        return _parse_host_port(self.listen)

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget if self.memory_budget is not None else 2 * self.max_message_size

    @field_validator("addresses")
    @classmethod
    def _lowercase_unique(cls, value: list[str]) -> list[str]:
        lowered = [a.lower() for a in value]
        if len(set(lowered)) != len(lowered):
            raise ValueError("an address is listed twice")
        return lowered

    @model_validator(mode="after")
    def _tls_pair(self) -> SmtpSection:
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError("tls_certificate and tls_key must be set together")
        if self.require_starttls and self.tls_certificate is None:
            raise ValueError("require_starttls needs tls_certificate and tls_key")
        if self.max_connections_per_ip > self.max_connections:
            raise ValueError("max_connections_per_ip cannot be more than max_connections")
        if self.memory_budget is not None and self.memory_budget < self.max_message_size:
            # a message near the size limit would never fit: 452 to its sender for ever
            raise ValueError("memory_budget cannot be less than max_message_size")
        return self

    @model_validator(mode="after")
    def _network_limit_between(self) -> SmtpSection:
        low, high = self.max_connections_per_ip, self.max_connections
        if "max_connections_per_network" not in self.model_fields_set:
            # The default gives way to the other two limits (a configuration that lowered
            # max_connections alone stays valid); frozen, hence __dict__.
            self.__dict__["max_connections_per_network"] = min(max(self.max_connections_per_network, low), high)
        elif not low <= self.max_connections_per_network <= high:
            raise ValueError(f"max_connections_per_network ({self.max_connections_per_network}) must be between "
                             f"max_connections_per_ip ({low}) and max_connections ({high})")
        return self


class DatabaseSection(Section):
    # SQLAlchemy URL. A relative SQLite path is relative to the config file.
    url: str = "sqlite:///var/intake.db"
    # Seconds to wait for a lock before a write fails (SQLite busy timeout, PostgreSQL lock_timeout).
    busy_timeout: float = Field(default=10.0, gt=0)


class ProcessingSection(Section):
    # Stored messages claimed, read and parsed per round.
    batch_size: int = Field(default=100, ge=1, le=10_000)
    # Bytes of mail claimed per round at most, but always one message: a larger one is a round alone.
    batch_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Seconds a round's claim on its messages holds unless renewed (it is, while the round runs): a
    # node that dies leaves them to the others after this. At least twice parse_timeout.
    claim_lease: float = Field(default=60.0, gt=0, le=86_400)
    # Messages acted on per write transaction (never more than 512 KB of mail): more means fewer
    # statements and commits per message; fewer keeps the database lock short, so the listener's
    # commits (and with them the 250s) wait less.
    messages_per_transaction: int = Field(default=20, ge=1, le=10_000)
    # Seconds between polls for pending messages when nothing wakes the processor.
    poll_interval: float = Field(default=1.0, gt=0)
    # Seconds (wall clock) parsing one message may take (in a helper process) before it is cut short.
    parse_timeout: float = Field(default=10.0, gt=0, le=3600)
    # Seconds of the helper's CPU for parsing, scoring and the text work of one message together;
    # then the message goes on with what was done and a warning (see intake.understand.parse_guard).
    message_budget: float = Field(default=2.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _lease_outlasts_a_parse(self) -> ProcessingSection:
        if self.claim_lease < 2 * self.parse_timeout:
            raise ValueError(f"claim_lease ({self.claim_lease:g}) must be at least twice parse_timeout "
                             f"({self.parse_timeout:g}): a claim is renewed between two messages, and must not run "
                             "out while one is parsed")
        return self


class OutboundSection(Section):
    # 'smtp': deliver through a relay; 'maildir': write each mail into a local Maildir.
    transport: Literal["smtp", "maildir"] = "maildir"
    # Maildir folder for transport = 'maildir'. Relative to the config file.
    maildir: Path = Path("var/outbox")
    # Relay for transport = 'smtp', 'host:port'.
    relay: HostPortText = "127.0.0.1:25"
    # Require STARTTLS with the relay (fail rather than send in clear).
    starttls: bool = False
    # Oldest TLS version spoken with the relay: "1.2" or "1.3". A relay that offers only older
    # ones gets nothing (the mail waits and is retried), never mail in clear instead.
    tls_min_version: TlsVersion = "1.2"
    # Relay login; its password comes from the 'relay-password' credential. Needs starttls = true.
    username: str | None = None
    # PEM file of the CA(s) that issued the relay's certificate, trusted instead of the system's
    # store (a private CA). Relative to the config file.
    ca_file: Path | None = None
    # Seconds for connecting and for each SMTP command with the relay.
    timeout: float = Field(default=30.0, gt=0)
    # Retry schedule for temporary failures: first delay, doubling up to the cap.
    retry_initial: float = Field(default=60.0, gt=0)
    retry_max: float = Field(default=3600.0, gt=0)
    # Give up (mark dead) after this many seconds of temporary failures.
    give_up_after: float = Field(default=5 * 24 * 3600.0, gt=0)
    # Seconds between outbox polls when nothing wakes the sender.
    poll_interval: float = Field(default=2.0, gt=0)

    @property
    def relay_address(self) -> HostPort:
        return _parse_host_port(self.relay)

    @model_validator(mode="after")
    def _login_over_tls_only(self) -> OutboundSection:
        if self.username and not self.starttls:
            raise ValueError("outbound.username is set but outbound.starttls = false: the relay password "
                             "would be sent in clear; set starttls = true (or remove username)")
        return self


class SenderAuthSection(Section):
    """``[sender_auth]``: who a message is really from (see :mod:`intake.understand.sender_auth`). A maintainer's
    mail is privileged only when its sender is authenticated; a reporter whose domain publishes
    DMARC is the reporter only when authenticated."""

    # authserv-ids (RFC 8601) of our own MX whose Authentication-Results header is believed: the
    # topmost header of a listed id only; every other one is ignored (a sender can write any header).
    trusted_authserv_ids: list[str] = Field(default_factory=list)
    # Without a trusted header, verify DKIM signatures (and look up DMARC records) ourselves.
    verify: bool = True
    # Seconds one DNS lookup may take, and most lookups made for one message.
    dns_timeout: float = Field(default=2.0, gt=0, le=30)
    max_dns_lookups: int = Field(default=4, ge=1, le=20)
    # Age after which a maintainer's reply address stops working (its answer carries a fresh one).
    reply_token_max_age: ElapsedText = "90 days"

    @field_validator("trusted_authserv_ids")
    @classmethod
    def _lowercase_ids(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value if v.strip()]


class ServiceSection(Section):
    # Seconds allowed for in-flight work on SIGTERM before exiting anyway.
    shutdown_grace: float = Field(default=20.0, gt=0)


class LoggingSection(Section):
    """``[logging]``: how ``intake serve`` writes its log lines to stderr (see :mod:`intake.run.logs`)."""

    # 'logfmt' (key=value pairs) or 'json' (one object per line).
    format: Literal["logfmt", "json"] = "logfmt"
    # Lowest level written.
    level: Literal["debug", "info", "warning", "error"] = "info"
    # sd-daemon(3) priority prefixes (<3> error ... <7> debug): 'auto' when stderr is the journal
    # ($JOURNAL_STREAM names it), or always / never.
    journal_prefix: Literal["auto", "always", "never"] = "auto"


class MetricsSection(Section):
    """``[metrics]``: the HTTP endpoint with /metrics, /livez and /readyz (see :mod:`intake.run.metrics`)."""

    # Serve the endpoint from `intake serve`.
    enabled: bool = True
    # Allow a listen address that is not loopback (put a firewall or an authenticating proxy in front).
    # Before `listen`: its validator reads it.
    allow_remote: bool = False
    # Where it binds, 'host:port'. Loopback only unless allow_remote: nothing on it is authenticated.
    listen: HostPortText = "127.0.0.1:9125"
    # /readyz fails while the oldest mail waiting in the outbox is older than this, in seconds.
    outbox_stuck_after: float = Field(default=3600.0, gt=0)

    @property
    def listen_address(self) -> HostPort:
        return _parse_host_port(self.listen)

    @property
    def memory_budget_bytes(self) -> int:
        return self.memory_budget if self.memory_budget is not None else 2 * self.max_message_size

    @field_validator("listen")
    @classmethod
    def _loopback_unless_allowed(cls, value: str, info: ValidationInfo) -> str:
        host = _parse_host_port(value).host
        if host == "localhost":
            return value
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ValueError(f"{host!r} must be an IP address or 'localhost'") from None
        if not loopback and not info.data.get("allow_remote"):
            raise ValueError(f"{host!r} is not a loopback address; the endpoint has no authentication "
                             "(set allow_remote = true to serve it anyway)")
        return value


class AutoReplySection(Section):
    # Most automatic mails (acknowledgements, out-of-scope replies) one address gets per window,
    # so two auto-responders can never ping-pong.
    limit_per_recipient: int = Field(default=5, ge=1)
    # The window, in seconds.
    window: float = Field(default=24 * 3600.0, gt=0)
    # Senders (local part, a regular expression matched whole, case-insensitive) never answered.
    # Matched against senders' addresses, so on RE2 (intake.patterns): no look-around or backreferences.
    never_reply_to: list[str] = Field(default_factory=lambda: [
        "mailer-daemon", "postmaster", "no-?reply", "do-?not-?reply", "bounces?", "daemon", "listserv",
        "majordomo", "owner-.*", ".*-request", ".*-bounces?", ".*-owner", "notifications?",
    ])

    @field_validator("never_reply_to")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                patterns.compile(pattern)
            except patterns.UnsupportedPattern as exc:
                raise ValueError(str(exc)) from None
        return value


def check_elapsed(value: str) -> str:
    duration = parse_duration(value)
    if duration.business or duration.amount == 0:
        raise ValueError(f"{value!r} must be a non-zero elapsed time (minutes, hours or days)")
    return value


ElapsedText = Annotated[str, AfterValidator(check_elapsed)]
Mailbox = Annotated[str, AfterValidator(_check_mailbox)]


def _check_person_name(name: str) -> str:
    """A maintainer's name must not read as intake itself or as an unmapped Unix account in events."""
    if name.strip().lower() == SYSTEM_ACTOR or name.startswith((UNIX_ACTOR_PREFIX, UID_ACTOR_PREFIX)):
        raise ValueError(f"{name!r} is how events of intake itself or of an account that is no maintainer are "
                         "recorded: choose another name")
    return name


class Maintainer(Section):
    # Who it is, as shown in events.
    name: Annotated[str, AfterValidator(_check_person_name)] = Field(min_length=1)
    # Address the maintainer mails from.
    email: Mailbox
    # Their Unix account on the host where they run `intake` (found from the uid, not $USER): CLI
    # changes are recorded as them.
    login: str | None = None
    # Their OpenPGP public key file: mail to them is encrypted to it.
    openpgp_key: Path | None = None


class AdvisorySection(Section):
    """``[advisory]``: how advisory drafts (:mod:`intake.tickets.advisory`) are identified."""

    # The OSV id is this prefix + the ticket reference ("" keeps the reference as it is).
    id_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,32}$")
