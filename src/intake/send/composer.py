"""Every mail intake sends, built one way: :func:`compose`, from a rendered template or a person's
text (:func:`automatic_reply` and :func:`notice` are its two common uses). It sets the headers that
keep threads and mail loops right (Message-ID, Date, In-Reply-To/References, Auto-Submitted, the
loop marker, X-Intake-Ticket) in one place. Builds bytes only; sending is the outbox's job.

A subject passes through :func:`intake.understand.header_text.clean_text` here, whoever built it, and
the stdlib's SMTP policy refuses any CR/LF left in a header, so text a sender wrote can never
smuggle a header into our mail.

Every line we write fits RFC 5322's 998 octets (2.1.1), whatever a researcher sent: a subject is
shortened with an ellipsis and folded (a word too long to fold is written as encoded-words), a body
with a longer line is sent quoted-printable, and a Message-ID we cannot reuse whole (cut short when
it was stored, or too long) is left out of In-Reply-To and References rather than cut.
"""

from __future__ import annotations

import email.policy
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.charset import QP, Charset
from email.header import Header
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr
from functools import lru_cache
from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape

from intake import patterns
from intake.language_tags import ENGLISH
from intake.send import localised
from intake.send.pgp_mime import Encryption, encrypted
from intake.understand.header_text import clean_text
from intake.vocabulary import CONTENT_LANGUAGE_HEADER, LOOP_HEADER, TICKET_HEADER, MailKind

class _Compat32(email.policy.Compat32):
    """compat32 that writes a short, plain ASCII header line as it is, and folds a long one of
    plain words itself. The stdlib runs every header through ``Header.encode``, which was most
    of the cost of composing an acknowledgement, for the same bytes."""

    def _fold(self, name: str, value: object, sanitize: bool) -> str:
        if isinstance(value, str) and value.isascii() and value.isprintable() and "  " not in value:
            if len(name) + 2 + len(value) <= self.max_line_length:
                return f"{name}: {value}{self.linesep}"
            words = value.split(" ")
            if self._words_fit(name, words) and "," not in value and ";" not in value:
                return self._fold_words(name, words)
        return super()._fold(name, value, sanitize)

    def _words_fit(self, name: str, words: list[str]) -> bool:
        """Every word (none empty) fits on its line: the first after the name, the others after a space."""
        return (all(words) and len(name) + 2 + len(words[0]) <= self.max_line_length
                and all(1 + len(word) <= self.max_line_length for word in words[1:]))

    def _fold_words(self, name: str, words: list[str]) -> str:
        """The lines ``Header.encode`` makes of *words* (single spaces between them, no ``;`` or
        ``,``, which it would rather break after): filled greedily up to max_line_length, each
        break before a space (an acknowledgement's "Re: [SEC-…] subject" is usually this long)."""
        lines, line, used = [], [words[0]], len(name) + 2 + len(words[0])
        for word in words[1:]:
            if used + 1 + len(word) > self.max_line_length:
                lines.append(" ".join(line))
                line, used = [""], 0
            line.append(word)
            used += 1 + len(word)
        lines.append(" ".join(line))
        return f"{name}: {self.linesep.join(lines)}{self.linesep}"


class _ModernFolding(email.policy.EmailPolicy):
    """The modern policy, but In-Reply-To and References written one Message-ID per line (it reads
    them as unstructured text and would turn an id longer than a line into encoded-words, which no
    mail client matches against its Message-IDs) and Subject folded as compat32 folds it (the
    modern folder doubles the space before an encoded-word, or folds right after the colon, and
    the subject then reads back with a space more)."""

    def _fold(self, name: str, value: object, refold_binary: bool = False) -> str:
        if name.lower() in _ID_LISTS:
            return f"{name}: " + f"{self.linesep} ".join(str(value).split()) + self.linesep
        if name.lower() == "subject":
            return _COMPAT32_CRLF.fold(name, _compat32_value(name, str(value)))
        return super()._fold(name, value, refold_binary)


_SMTP = _ModernFolding(linesep="\r\n")
_SMTPUTF8 = _SMTP.clone(utf8=True)
_COMPAT32_CRLF = _Compat32(linesep="\r\n")  # SMTP line endings
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP  # readable in a raw mail file, unlike base64
_ASCII_QP = Charset("us-ascii")
_ASCII_QP.body_encoding = QP  # for ASCII text with a line too long to send as it is

# RFC 5322 2.1.1: at most 998 octets a line, CRLF excluded; ours stay within it CRLF included.
MAX_LINE = 998 - 2
# A researcher's subject where we reuse it (characters, the ellipsis included) ...
MAX_SUBJECT = 200
# ... and any Subject we send, our prefixes and suffixes included.
_MAX_SUBJECT_HEADER = 300
# Longest Message-ID reused in In-Reply-To / References (ours are under 100 characters).
MAX_MESSAGE_ID = 250
_REUSABLE_MESSAGE_ID = re.compile(r"<[!-;=?-~]+>")  # printable ASCII, no '<' or '>' inside
_ID_LISTS = ("in-reply-to", "references")
NO_SUBJECT_TEMPLATE = "no-subject.txt.j2"
# Headers that are not free text: never encoded-words, and folded by their own rules.
_STRUCTURED = frozenset({"from", "to", "cc", "reply-to", "date", "message-id", *_ID_LISTS})

# Marks mail we sent, so our own mail coming back is recognised as a loop.
# Applied to senders' subjects: RE2 (intake.patterns).
_REPLY_PREFIX = patterns.compile(r"^\s*((re|fwd?|aw|sv|vs|antw|wg|tr)\s*(\[\d+\])?\s*:\s*)+", ignorecase=True)


@dataclass(frozen=True)
class OutgoingMail:
    dedupe_key: str
    kind: str
    envelope_from: str  # '' = null sender
    recipients: list[str]
    message_id: str
    raw: bytes
    rate_limited: bool = False  # counted against the per-recipient limit on automatic mail


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class PromisedDate:
    label: str
    due: datetime
    timezone: str
    note: str = ""
    # A date that depends on a severity not assessed yet: the date for each group of severities
    # (label "critical or high", *severities* those), earliest (= due) first.
    by_severity: tuple[PromisedDate, ...] = ()
    # What the label names, for templates in another language: the stage's milestone (None for a
    # stage of the policy's own), or the severities of a by_severity date.
    milestone: str | None = None
    severities: tuple[str, ...] = ()
    language: str = ENGLISH  # how due_local writes the date

    @property
    def due_local(self) -> str:
        return localised.date_time(self.due, self.timezone, self.language)


@lru_cache(maxsize=16)
def _environment(override_dir: str | None, language: str) -> Environment:
    folders = localised.language_folders(language, Path(override_dir) if override_dir else None)
    if language != ENGLISH:  # then English: the maintainers' templates, and what a language's templates include
        folders += localised.language_folders(ENGLISH, Path(override_dir) if override_dir else None)
    loaders = [FileSystemLoader(folder) for folder in folders]
    # Plain-text templates are not escaped; HTML ones (*.html.j2: the digest's alternative) are, as
    # they show reporters' subjects. StrictUndefined turns a template typo into an error.
    return Environment(loader=ChoiceLoader(loaders), autoescape=select_autoescape(["html.j2"], default=False),
                       undefined=StrictUndefined, keep_trailing_newline=True)


def render(template: str, override_dir: Path | None, language: str = ENGLISH, **context: object) -> str:
    """*template* rendered with *context*, in *language* (see :mod:`intake.send.localised`)."""
    environment = _environment(str(override_dir) if override_dir else None, language)
    return environment.get_template(template).render(**context)


def no_subject(override_dir: Path | None, language: str) -> str:
    """What a subject reads when the reporter's had none, in *language* (template ``no-subject.txt.j2``)."""
    return render(NO_SUBJECT_TEMPLATE, override_dir, language).strip()


def shorten(text: str, limit: int = MAX_SUBJECT) -> str:
    """*text*, or its start and an ellipsis in *limit* characters when it is longer."""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def reusable_message_ids(value: str) -> list[str]:
    """The Message-IDs in *value* that can be written back whole: complete ``<...>``, printable
    ASCII, at most MAX_MESSAGE_ID characters. A stored id cut short (``<abc…`` without its ``>``)
    is dropped whole: a cut one would leave References unterminated."""
    return [word for word in value.split()
            if len(word) <= MAX_MESSAGE_ID and _REUSABLE_MESSAGE_ID.fullmatch(word)]


def bounded_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """*headers* as they can be sent: Subject shortened, In-Reply-To and References reduced to the
    ids that can be reused whole (and left out when none can)."""
    bounded = []
    for name, value in headers:
        key = name.lower()
        if key in _ID_LISTS:
            ids = reusable_message_ids(value)
            if not ids:
                continue
            value = " ".join(ids[-1:] if key == "in-reply-to" else ids)
        elif key == "subject":
            value = shorten(value, _MAX_SUBJECT_HEADER)
        bounded.append((name, value))
    return bounded


def strip_reply_prefixes(subject: str) -> str:
    """'Re: Fwd: AW: hello' -> 'hello'."""
    return _REPLY_PREFIX.sub("", subject).strip()


def new_message_id(kind: str, ticket: str | None, domain: str) -> str:
    """A unique Message-ID on our domain that names what it is: <acknowledgement.SEC-2026-0001.1f2e…@example.com>."""
    return f"<{kind}.{ticket + '.' if ticket else ''}{secrets.token_hex(8)}@{domain}>"


def _needs_utf8(*addresses: str) -> bool:
    return any(not address.isascii() for address in addresses)


# RFC 3834's Auto-Submitted values: automatic mail goes from the null sender, and well-behaved
# software never answers it automatically.
AUTO_REPLIED = "auto-replied"  # answers a message: an acknowledgement, a confirmation
AUTO_GENERATED = "auto-generated"  # answers none: notices, forwards, digests
# References we write: the answered mail's own, and its Message-ID, at most this many.
_MAX_REFERENCES = 20


def compose(
    kind: str,
    *,
    sender: tuple[str, str],
    to: list[str],
    subject: str,
    text: str,
    ticket: str | None,
    message_id_domain: str,
    now: datetime,
    dedupe_key: str | None = None,
    cc: tuple[str, ...] = (),
    reply_to: str | None = None,
    in_reply_to: str | None = None,
    references: list[str] | tuple[str, ...] = (),
    automatic: str | None = None,
    rate_limited: bool = False,
    html: str | None = None,
    attachments: tuple[Attachment, ...] = (),
    encryption: Encryption | None = None,
    language: str | None = None,
) -> OutgoingMail:
    """Every mail intake sends, built the one way: *text* (a rendered template, or a person's
    words) from *sender* (display name, address) to *to* and *cc*.

    The headers that keep mail loops and threads right are set here and nowhere else: a fresh
    Message-ID naming *kind* and *ticket*, Date, In-Reply-To and References when the mail answers
    *in_reply_to* (whose own References are *references*), our loop marker on every mail, and
    X-Intake-Ticket on mail about a *ticket*. *automatic* mail (:data:`AUTO_REPLIED` or
    :data:`AUTO_GENERATED`) says so in Auto-Submitted, asks Exchange and friends not to answer
    it, and goes from the null sender so that nothing bounces back to us; a person's mail goes
    from *sender*'s address. *rate_limited* mail counts against the per-recipient limit on
    automatic mail. The subject is made display-safe (:func:`clean_text`), so text a sender
    wrote can never become a header. Without a *dedupe_key* the mail is never deduplicated. With
    *encryption* it is sent as PGP/MIME to the recipients' keys (:mod:`intake.send.pgp_mime`).
    Mail written in a known *language* (a template's) says so in Content-Language."""
    message_id = new_message_id(kind, ticket, message_id_domain)
    headers = [("To", ", ".join(to))]
    if cc:
        headers.append(("Cc", ", ".join(cc)))
    headers += [("Subject", clean_text(subject)), ("Date", format_datetime(now)), ("Message-ID", message_id)]
    if reply_to:
        headers.append(("Reply-To", reply_to))
    if in_reply_to:
        headers += [("In-Reply-To", in_reply_to),
                    ("References", " ".join([*references, in_reply_to][-_MAX_REFERENCES:]))]
    if automatic:
        headers += [("Auto-Submitted", automatic), ("X-Auto-Response-Suppress", "All")]
    headers.append((LOOP_HEADER, message_id_domain))
    if ticket:
        headers.append((TICKET_HEADER, ticket))
    if language:
        headers.append((CONTENT_LANGUAGE_HEADER, language))
    raw = (alternative_bytes(sender, headers, text, html) if html is not None
           else text_bytes(sender, headers, text, attachments))
    if encryption is not None:
        raw = encrypted(raw, encryption)
    return OutgoingMail(dedupe_key=dedupe_key or f"{kind}:{ticket}:{message_id}", kind=kind,
                        envelope_from="" if automatic else sender[1], recipients=[*to, *cc], message_id=message_id,
                        raw=raw, rate_limited=rate_limited)


# Dedupe-key prefix per kind of automatic reply: one of each per ticket, ever.
_KEY_PREFIX = {MailKind.ACKNOWLEDGEMENT: "ack", MailKind.OUT_OF_SCOPE: MailKind.OUT_OF_SCOPE}


def automatic_reply(
    *,
    template: str,
    kind: str,
    reference: str,
    subject: str,
    reporter_address: str,
    reporter_name: str,
    intake_address: str,
    from_name: str,
    in_reply_to: str | None,
    references: list[str],
    deadlines: list[PromisedDate],
    policy: str,
    message_id_domain: str,
    templates_dir: Path | None,
    now: datetime,
    policy_url: str | None = None,
    acknowledges: bool = False,
    pauses_while_waiting: bool = False,
    encryption: Encryption | None = None,
    language: str = ENGLISH,
) -> OutgoingMail:
    """An automatic reply to a new report (*template* rendered; RFC 3834: auto-replied, from the
    null sender, counted against the reporter's limit), encrypted with *encryption* if given.
    *policy* is the policy's title as reporters read it; *acknowledges*: this reply meets the
    policy's acknowledgement; *pauses_while_waiting*: the *deadlines* move later while the ticket
    waits on the reporter. It is written in *language*."""
    shown_subject = shorten(strip_reply_prefixes(clean_text(subject))) or no_subject(templates_dir, language)
    body = render(
        template,
        templates_dir,
        language,
        reference=reference,
        subject=shown_subject,
        reporter_name=clean_text(reporter_name),
        deadlines=deadlines,
        policy=policy,
        policy_url=policy_url,
        acknowledges=acknowledges,
        pauses_while_waiting=pauses_while_waiting,
        from_name=from_name,
        intake_address=intake_address,
    )
    return compose(kind, sender=(from_name, intake_address), to=[reporter_address],
                   subject=f"Re: [{reference}] {shown_subject}", text=body, ticket=reference,
                   message_id_domain=message_id_domain, now=now, dedupe_key=f"{_KEY_PREFIX[kind]}:{reference}",
                   in_reply_to=in_reply_to, references=references, automatic=AUTO_REPLIED, rate_limited=True,
                   encryption=encryption, language=language)


def notice(
    kind: str,
    *,
    dedupe_key: str,
    ticket: str | None,
    subject: str,
    recipients: list[str],
    sender: tuple[str, str],
    reply_to: str | None,
    text: str,
    html: str | None = None,
    message_id_domain: str,
    now: datetime,
    encryption: Encryption | None = None,
) -> OutgoingMail:
    """A notice to maintainers (new ticket, reminder, breach, escalation, refusal, digest) about
    *ticket* (None for a digest): automatic mail nothing asked for, replying to *reply_to*;
    encrypted with *encryption* if given."""
    return compose(kind, sender=sender, to=recipients, subject=subject, text=text, html=html, ticket=ticket,
                   message_id_domain=message_id_domain, now=now, dedupe_key=dedupe_key, reply_to=reply_to,
                   automatic=AUTO_GENERATED, encryption=encryption)


def alternative_bytes(sender: tuple[str, str], headers: list[tuple[str, str]], text: str, html: str) -> bytes:
    """A multipart/alternative message (plain text, then HTML) as bytes, with SMTP line endings."""
    for name, value in headers:
        if "\r" in value or "\n" in value:
            raise ValueError(f"{name} header value contains a line break")
    headers = bounded_headers(headers)
    message = EmailMessage(policy=_SMTPUTF8 if _needs_utf8(sender[1], *(v for h, v in headers if h == "To"))
                           else _SMTP)
    message["From"] = Address(display_name=sender[0], addr_spec=sender[1])
    for header, value in headers:
        message[header] = value
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message.as_bytes()


def text_bytes(sender: tuple[str, str], headers: list[tuple[str, str]], body: str,
               attachments: tuple[Attachment, ...] = ()) -> bytes:
    """A text/plain message (multipart/mixed with *attachments*) as bytes. *headers* values must
    already be display-safe.

    ASCII addresses go through the stdlib's compat32 classes, four times cheaper than its
    modern header registry; mail to an SMTPUTF8 (non-ASCII) address, or with attachments, uses
    the modern policy.
    """
    for name, value in headers:
        if "\r" in value or "\n" in value:  # belt and braces: clean_text already removed them
            raise ValueError(f"{name} header value contains a line break")
    headers = bounded_headers(headers)
    name, address = sender
    recipients = [value for header, value in headers if header in ("To", "Cc")]
    if attachments or _needs_utf8(address, *recipients):
        # The modern policy folds every header and picks quoted-printable or base64 for long lines.
        policy = _SMTPUTF8 if _needs_utf8(address, *recipients) else _SMTP
        message = EmailMessage(policy=policy)
        message["From"] = Address(display_name=name, addr_spec=address)
        for header, value in headers:
            message[header] = value
        message.set_content(body)
        for attachment in attachments:
            maintype, _, subtype = attachment.content_type.partition("/")
            message.add_attachment(attachment.data, maintype=maintype or "application",
                                   subtype=subtype or "octet-stream", filename=attachment.filename)
        return message.as_bytes()
    fields = [("From", formataddr((name, address), charset="utf-8")), *_compat32_fields(headers)]
    lines = _LINE_BREAK.split(body)
    if body.isascii() and max(map(len, lines)) <= MAX_LINE:
        return _ascii_text(fields, lines)
    text = MIMEText(body, "plain", _ASCII_QP if body.isascii() else _UTF8_QP)
    for header, value in fields:
        text[header] = value
    return text.as_bytes(policy=_COMPAT32_CRLF)


def _compat32_fields(headers: list[tuple[str, str]]) -> list[tuple[str, str | Header]]:
    return [(name, _compat32_value(name, value)) for name, value in headers]


def _compat32_value(name: str, value: str) -> str | Header:
    """A header value for the compat32 classes: text that is not ASCII, or has a word too long to
    fold at 78, as encoded-words (which fold anywhere); the rest as it is."""
    room = _COMPAT32_CRLF.max_line_length
    # (A value that fits after its name has no word too long: the usual case, and cheap.)
    unfoldable = (len(name) + 2 + len(value) > room and name.lower() not in _STRUCTURED
                  and len(name) + 2 + max(map(len, value.split()), default=0) > room)
    return value if value.isascii() and not unfoldable else Header(value, "utf-8", header_name=name)


# What MIMEText gives an ASCII text, before the caller's headers.
_ASCII_TEXT_FIELDS = (("Content-Type", 'text/plain; charset="us-ascii"'), ("MIME-Version", "1.0"),
                      ("Content-Transfer-Encoding", "7bit"))
# Their lines, the same in every such mail: folded once.
_ASCII_TEXT_HEAD = b"".join(_COMPAT32_CRLF.fold_binary(name, value) for name, value in _ASCII_TEXT_FIELDS)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _ascii_text(fields: list[tuple[str, object]], lines: list[str]) -> bytes:
    """The bytes ``MIMEText(body, "plain", "us-ascii")`` with *fields* gives through the stdlib's
    generator (same folding, same line endings) for the body of these *lines*, written directly:
    the generator's walk over the message was most of what an acknowledgement cost the worker."""
    head = _ASCII_TEXT_HEAD + b"".join(_COMPAT32_CRLF.fold_binary(name, value) for name, value in fields)
    return head + b"\r\n" + "\r\n".join(lines).encode("ascii")
