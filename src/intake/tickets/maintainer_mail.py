"""A ticket worked entirely by mail: maintainers' replies relayed, their commands applied, and the
reporter's replies forwarded to them.

A maintainer answers a notification at its signed reply address (:mod:`intake.understand.reply_tokens`;
routing only says ``authenticated`` when the token is the sender's). Command lines at the top
(``#severity high``, ``#assign ana``, ``#state waiting``, ``#released 1.4.2``, …) change the
ticket through the same service functions as the CLI; the rest, with quoted history and the
signature trimmed, goes to the reporter from the intake address with its attachments, unless the
mail starts with ``#note`` (then it stays internal). The sender gets a confirmation of what was
done. The reporter's own replies are forwarded to the assignee, or to every maintainer, each copy
with that maintainer's reply address, so a thread can run by mail alone. A third party's mail in
the thread is forwarded the same way but marked as such, without a reply address: answering it
must not reach the reporter by mistake.

The researcher never gets a maintainer's address: relayed text is new mail from the intake
address, trimmed of the quoted thread and signature, with the maintainer's address blanked.
"""

from __future__ import annotations

import logging
import shlex
from datetime import datetime
from typing import TYPE_CHECKING

from email.utils import format_datetime
from sqlmodel import Session

from intake import patterns
from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.store.inbound import StoredMessage
from intake.store.models import Ticket
from intake.tickets import correspondence, credit, milestones, triage
from intake.understand import decisions, reply_tokens, route
from intake.understand.content import extract_attachment
from intake.understand.header_text import clean_text
from intake.vocabulary import LOOP_HEADER, THIRD_PARTY_REPLY, TICKET_HEADER, MailKind, Milestone, TicketState

if TYPE_CHECKING:
    from intake.understand.text_work import TextWork  # which reads its text with this module's functions

log = logging.getLogger(__name__)

# Where quoted history starts in a reply: "On Mon, … wrote:", Outlook's separator and header block.
# Both patterns see mail text: RE2 (intake.patterns).
_QUOTE_START = patterns.compile(
    r"^(on .{0,200}wrote:\s*$|-{2,}\s*original message\s*-{2,}|_{10,}\s*$|from:\s.+$|am .{0,200}schrieb .{0,80}:\s*$)",
    ignorecase=True)
# What each alternative of _QUOTE_START begins with, lowercased: other lines skip the regex.
_QUOTE_START_PREFIXES = ("on ", "--", "__________", "from:", "am ")
_SIGNATURE = "-- "
# Command lines carried out per mail; more are refused, in one line of the confirmation.
MAX_COMMANDS = 20
_COMMAND = patterns.compile(r"^#([a-z-]+)\b\s*(.*)$", ignorecase=True)


def trim_reply(text: str) -> str:
    """*text* without the quoted thread (``>`` lines, "On … wrote:" and below) and the signature."""
    kept = []
    for line in text.splitlines():
        if line.rstrip() == _SIGNATURE.rstrip() and line.startswith("--"):
            break
        stripped = line.strip()
        if stripped.lower().startswith(_QUOTE_START_PREFIXES) and _QUOTE_START.match(stripped):
            break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept).strip("\n")


def split_commands(text: str) -> tuple[list[tuple[str, str]], str]:
    """The ``#command args`` lines at the top of *text* (blank lines between them allowed) and the rest.
    Past ``MAX_COMMANDS`` commands (none of which will be carried out) any ``#`` line is one more,
    named by its first word: no regex per line of a flood."""
    lines = text.splitlines()
    commands = []
    position = 0
    while position < len(lines):
        line = lines[position].strip()
        if len(commands) > MAX_COMMANDS and line.startswith("#"):
            commands.append((line[1:].split(maxsplit=1)[0].lower() if line[1:].strip() else "", ""))
        elif line and not (match := _COMMAND.match(line)):
            break
        elif line:
            commands.append((match.group(1).lower(), match.group(2).strip()))
        position += 1
    return commands, "\n".join(lines[position:])


class CommandError(ValueError):
    pass


def _apply(session: Session, settings: Settings, ticket: Ticket, name: str, args: str, *, now: datetime,
           actor: str) -> str:
    """Carry out one mail command on *ticket*; returns what was done, raises with why not."""
    words = shlex.split(args) if args else []
    if name == "severity":
        if not words or len(words) > 2:
            raise CommandError("usage: #severity critical|high|medium|low|none [CVSS-vector]")
        _, warning = triage.set_severity(session, settings, ticket, words[0].lower(), now=now, actor=actor,
                                         cvss_vector=words[1] if len(words) > 1 else None)
        return f"severity {ticket.severity}" + (f" (CVSS {ticket.cvss_score})" if len(words) > 1 else "") + \
            (f"; warning: {warning}" if warning else "")
    if name == "assign":
        if len(words) != 1:
            raise CommandError("usage: #assign <maintainer>")
        return f"assigned to {triage.assign(session, settings, ticket, words[0], now=now, actor=actor)}"
    if name == "state":
        wanted = words[0].lower() if len(words) == 1 else ""
        if wanted == TicketState.WAITING:
            milestones.wait(session, settings, ticket, now=now, actor=actor)
        elif wanted in ("resume", "resumed", "open"):
            milestones.resume(session, settings, ticket, now=now, actor=actor)
        else:
            raise CommandError("usage: #state waiting|resume")
        return f"state {ticket.state}"
    if name == Milestone.RELEASED:
        milestones.record(session, settings, ticket, Milestone.RELEASED, at=now, now=now, actor=actor,
                          version=words[0] if words else None)
        return Milestone.RELEASED + (f" {words[0]}" if words else "")
    if name in ("ack", Milestone.ACKNOWLEDGED):
        milestones.record(session, settings, ticket, Milestone.ACKNOWLEDGED, at=now, now=now, actor=actor)
        return Milestone.ACKNOWLEDGED
    if name == "assess":
        if len(words) != 1:
            raise CommandError("usage: #assess <severity>")
        milestones.assess(session, settings, ticket, words[0].lower(), at=now, now=now, actor=actor)
        return f"assessed, severity {ticket.severity}"
    if name in (Milestone.DISCLOSED, Milestone.RESOLVED):
        milestones.record(session, settings, ticket, name, at=now, now=now, actor=actor)
        return name
    if name == "close":
        if len(words) != 1:
            raise CommandError("usage: #close fixed|invalid|duplicate|out-of-scope|spam")
        triage.close(session, settings, ticket, words[0].lower(), now=now, actor=actor)
        return f"closed ({ticket.close_reason})"
    if name == "credit":
        if not words:
            raise CommandError("usage: #credit <name> [@handle] [https://url] | #credit anonymous")
        if [w.lower() for w in words] == ["anonymous"]:
            wanted = credit.make(anonymous=True, source="mail")
        else:
            handle = next((w for w in words if w.startswith("@")), None)
            url = next((w for w in words if w.startswith(("https://", "http://"))), None)
            name = " ".join(w for w in words if w not in (handle, url)) or None
            try:
                wanted = credit.make(name=name, handle=handle, url=url, source="mail")
            except credit.CreditError as exc:
                raise CommandError(str(exc)) from None
        credit.set_credit(session, ticket, wanted, now, actor)
        return f"credit: {wanted.display}"
    if name == "label":
        if not words:
            raise CommandError("usage: #label <label> …")
        return "labels " + ", ".join(triage.label(session, ticket, tuple(words), (), now=now, actor=actor))
    raise CommandError(f"unknown command #{name} (known: #severity #assign #state #released #ack #assess "
                       "#disclosed #resolved #close #label #credit #note)")


def act_on(session: Session, settings: Settings, stored: StoredMessage, incoming: route.Incoming,
           decision: route.Decision, now: datetime, reply_secret: bytes, work: TextWork) -> None:
    """After a threaded message was recorded on its ticket: a maintainer's authenticated mail is
    carried out (its commands and trimmed text read beforehand, *work*), a reporter's reply is
    forwarded to the maintainers (signing their reply addresses with *reply_secret*), a third
    party's is forwarded marked as theirs."""
    mail = decisions.handling(decision).mail
    if mail is decisions.Mail.MAINTAINER_MAIL and decision.authenticated and incoming.authentication.authenticated:
        _maintainer_mail(session, settings, stored, incoming, decision, now, work)
    elif mail is decisions.Mail.FORWARD:
        _forward_to_maintainers(session, settings, incoming, decision, now, reply_secret)


def _maintainer_mail(session: Session, settings: Settings, stored: StoredMessage, incoming: route.Incoming,
                     decision: route.Decision, now: datetime, work: TextWork) -> None:
    ticket = session.get(Ticket, decision.ticket_id)
    maintainer = settings.find_maintainer(incoming.sender)
    assert ticket is not None and maintainer is not None  # routing authenticated them
    done, failed = [], []
    if work.more_commands:
        failed.append(f"{work.more_commands} command line(s) after the first {MAX_COMMANDS}: not carried out")
    for name, args in work.commands:
        if name == "note":
            continue
        try:
            with session.begin_nested():  # a refused command leaves nothing half done
                done.append(_apply(session, settings, ticket, name, args, now=now, actor=maintainer.name))
        except (CommandError, milestones.Refused) as exc:
            failed.append(f"#{name} {args}".strip() + f": {exc}")
    # Any case: the domain part is case-blind, and mail clients write Ana@Example.com as they like.
    own_address = patterns.compile(patterns.escape(maintainer.email), ignorecase=True)
    text = own_address.sub("[maintainer]", work.relayed_text)
    attachments = _attachments(stored, incoming)
    if work.internal and text.strip():
        correspondence.note(session, ticket, text, now=now, actor=maintainer.name)
        done.append("added your text as an internal note")
    elif text.strip() or attachments:
        correspondence.reply(session, settings, ticket, text or "(see the attached files)", now=now,
                             actor=maintainer.name, attachments=attachments)
        done.append(f"sent your reply to the reporter{f' with {len(attachments)} attachment(s)' if attachments else ''}")
    log.info("event=maintainer-mail ticket=%s maintainer=%s done=%d refused=%d", ticket.reference,
             maintainer.email, len(done), len(failed))
    _confirm(session, settings, ticket, incoming, maintainer.email, done, failed, now)


def _attachments(stored: StoredMessage, incoming: route.Incoming) -> tuple[composer.Attachment, ...]:
    found = []
    for attachment in incoming.mail.attachments:
        try:
            meta, data = extract_attachment(stored.raw, attachment.index)
        except LookupError:
            continue
        found.append(composer.Attachment(meta.filename, meta.content_type, data))
    return tuple(found)


def _confirm(session: Session, settings: Settings, ticket: Ticket, incoming: route.Incoming, maintainer: str,
             done: list[str], failed: list[str], now: datetime) -> None:
    """Tell the maintainer what their mail did (automatic mail: no one answers it automatically)."""
    lines = [f"Your mail about {ticket.reference} was received."]
    lines += ["", "Done:", *(f"- {item}" for item in done)] if done else ["", "Nothing was changed or sent."]
    lines += ["", "Refused:", *(f"- {item}" for item in failed)] if failed else []
    message_id = composer.new_message_id("confirm", ticket.reference, settings.intake.message_id_domain)
    subject = f"Re: [{ticket.reference}] {composer.shorten(clean_text(ticket.subject))} (done)"
    headers = [("To", maintainer), ("Subject", subject),
               ("Date", format_datetime(now)), ("Message-ID", message_id)]
    if incoming.mail.message_id:
        headers.append(("In-Reply-To", incoming.mail.message_id))
    headers += [("Auto-Submitted", "auto-replied"), (LOOP_HEADER, settings.intake.message_id_domain),
                (TICKET_HEADER, ticket.reference)]
    outbox.enqueue(session, composer.OutgoingMail(
        dedupe_key=f"confirm:{ticket.reference}:{message_id}", kind=MailKind.CONFIRMATION, envelope_from="",
        recipients=[maintainer], message_id=message_id,
        raw=composer.compose((settings.intake.from_name, ticket.intake_address), headers, "\n".join(lines) + "\n")),
        ticket_id=ticket.id, now=now)


def refused(session: Session, settings: Settings, incoming: route.Incoming, decision: route.Decision,
            now: datetime, secret: bytes) -> None:
    """Tell the maintainer whose reply address *decision* refused why, with a fresh reply address:
    at most once a day per ticket (the dedupe key), however often the address is tried. Only the
    address's owner hears of it, never the sender, who may be forged."""
    assert decision.refused is not None
    ticket, maintainer = session.get(Ticket, decision.refused.ticket.id), decision.refused.maintainer
    assert ticket is not None
    address = reply_tokens.reply_address(secret, ticket.intake_address, ticket.reference, maintainer, now)
    if incoming.authentication.authenticated:
        advice = "Please send your mail again to the fresh reply address below."
    else:
        advice = ("Mail to your reply address counts only when its sender is authenticated (DMARC pass, or a\n"
                  "DKIM signature aligned with your From: domain). If you sent it, check your domain's DKIM\n"
                  "signing; if you did not, someone else knows your reply address (intake secret rotate\n"
                  "makes every earlier one stop working).")
    text = "\n".join([
        f"A mail to your reply address for {ticket.reference} was refused: nothing on the ticket was changed",
        "and nothing was sent to the reporter.",
        "",
        f"Reason: {clean_text(decision.reason)}",
        f"Envelope sender: {clean_text(incoming.mail_from) or '(none)'}",
        "",
        advice,
        "",
        f"Your fresh reply address for {ticket.reference} (valid for "
        f"{settings.sender_auth.reply_token_max_age}): {address}",
        "",
        "You get at most one such notice a day for this ticket.",
    ]) + "\n"
    queued = outbox.enqueue(session, composer.maintainer_mail(
        kind=MailKind.REPLY_REFUSED, dedupe_key=f"refused:{ticket.reference}:{maintainer}:{now.date().isoformat()}",
        reference=ticket.reference, subject=f"[{ticket.reference}] Your mail was refused: nothing changed",
        recipients=[maintainer], sender=(settings.intake.from_name, ticket.intake_address),
        reply_to=address, text=text, message_id_domain=settings.intake.message_id_domain, now=now),
        ticket_id=ticket.id, now=now)
    log.info("event=maintainer-mail-refused ticket=%s maintainer=%s notified=%s", ticket.reference, maintainer,
             queued)


def maintainer_recipients(settings: Settings, ticket: Ticket) -> list[str]:
    """Who hears about a ticket: its assignee, else every maintainer."""
    if ticket.assignee:
        return [ticket.assignee]
    return [maintainer.email for maintainer in settings.maintainers]


def _forward_to_maintainers(session: Session, settings: Settings, incoming: route.Incoming, decision: route.Decision,
                            now: datetime, secret: bytes) -> None:
    ticket = session.get(Ticket, decision.ticket_id)
    assert ticket is not None
    recipients = maintainer_recipients(settings, ticket)
    if not recipients:
        log.info("event=%s-not-forwarded ticket=%s reason=no-maintainers", decision.kind, ticket.reference)
        return
    mail = incoming.mail

    def from_line(address: str) -> str:
        return f"From: {clean_text(mail.from_name)} <{address}>" if mail.from_name else f"From: {address}"

    third_party = decision.kind == THIRD_PARTY_REPLY
    if third_party:
        verdict = incoming.authentication
        intro = [
            f"Someone who is NOT the reporter of {ticket.reference} wrote into its thread "
            f"({clean_text(ticket.subject)}).",
            f"Envelope sender: {incoming.mail_from}",
            from_line(mail.from_address),
            f"Why a third party: {clean_text(decision.reason)}",
            f"Sender authentication: {verdict.result} ({clean_text(verdict.reason)})",
        ]
        advice = ["Nothing on the ticket changed (credit, state, reporter flags) and intake did not answer them.",
                  "This mail has no reply address: a reply to it is only recorded on the ticket and reaches",
                  "neither them nor the reporter."]
    else:
        intro = [f"The reporter of {ticket.reference} replied ({clean_text(ticket.subject)}).",
                 from_line(incoming.sender)]
        advice = ["Reply to this mail to answer the reporter (from the security address, never yours).",
                  "Command lines at the top (#severity high, #assign <who>, #state waiting, #released 1.4.2)",
                  "change the ticket; start with #note to keep your text internal."]
    body = "\n".join([
        *intro,
        f"Subject: {clean_text(mail.subject)}",
        f"Attachments: {len(mail.attachments)} (see `intake show {ticket.reference}`)" if mail.attachments else "",
        "",
        *advice,
        "",
        "-" * 72,
        mail.body_text.strip(),
    ]) + "\n"
    what = "third party (not the reporter) wrote" if third_party else "reporter replied"
    for maintainer in recipients:
        message_id = composer.new_message_id("fwd", ticket.reference, settings.intake.message_id_domain)
        address = reply_tokens.reply_address(secret, ticket.intake_address, ticket.reference, maintainer, now)
        headers = [("To", maintainer), *([] if third_party else [("Reply-To", address)]),
                   ("Subject", f"[{ticket.reference}] {what}: {composer.shorten(clean_text(mail.subject))}"),
                   ("Date", format_datetime(now)), ("Message-ID", message_id),
                   ("Auto-Submitted", "auto-generated"), (LOOP_HEADER, settings.intake.message_id_domain),
                   (TICKET_HEADER, ticket.reference)]
        outbox.enqueue(session, composer.OutgoingMail(
            dedupe_key=f"forward:{ticket.reference}:{incoming.message_key}:{maintainer.lower()}",
            kind=MailKind.THIRD_PARTY_FORWARD if third_party else MailKind.REPORTER_REPLY_FORWARD, envelope_from="",
            recipients=[maintainer], message_id=message_id,
            raw=composer.compose((f"{settings.intake.from_name} ({ticket.reference})", ticket.intake_address),
                                headers, body)),
            ticket_id=ticket.id, now=now)
