"""A ticket worked entirely by mail: maintainers' replies relayed, their commands applied, and the
reporter's replies forwarded to them.

A maintainer answers a notification at its signed reply address (:mod:`intake.understand.reply_tokens`;
routing only says ``authenticated`` when the token is the sender's). Command lines at the top
(``#severity high``, ``#assign ana``, …: :mod:`intake.tickets.mail_commands`) change the
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
from datetime import date, datetime

from sqlmodel import Session

from intake import patterns
from intake.config.settings import Settings
from intake.send import composer, outbox
from intake.store import inbound
from intake.store.inbound import StoredMessage
from intake.store.models import Ticket
from intake.tickets import correspondence, disclosure, mail_commands, reporter_keys
from intake.understand import decisions, pgp_inbound, reply_tokens, route
from intake.understand.content import extract_attachment
from intake.understand.header_text import clean_text
from intake.understand.text_work import MAX_COMMANDS, TextWork
from intake.vocabulary import THIRD_PARTY_REPLY, MailKind

log = logging.getLogger(__name__)


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
        _forward_to_maintainers(session, settings, incoming, decision, now, reply_secret, work.disclosure_date)


def _maintainer_mail(session: Session, settings: Settings, stored: StoredMessage, incoming: route.Incoming,
                     decision: route.Decision, now: datetime, work: TextWork) -> None:
    ticket = session.get(Ticket, decision.ticket_id)
    maintainer = settings.find_maintainer(incoming.sender)
    assert ticket is not None and maintainer is not None  # routing authenticated them
    outcome = mail_commands.carry_out(mail_commands.Request(session, settings, ticket, now, maintainer.name),
                                      work.commands)
    if work.more_commands:
        outcome.refused.insert(0, f"{work.more_commands} command line(s) after the first {MAX_COMMANDS}: "
                                  "not carried out")
    # Any case: the domain part is case-blind, and mail clients write Ana@Example.com as they like.
    own_address = patterns.compile(patterns.escape(maintainer.email), ignorecase=True)
    text = own_address.sub("[maintainer]", work.relayed_text)
    attachments = _attachments(inbound.raw_of(session, stored), incoming, pgp_inbound.decryption(settings))
    if work.internal and text.strip():
        correspondence.note(session, ticket, text, now=now, actor=maintainer.name)
        outcome.done.append("added your text as an internal note")
    elif text.strip() or attachments:
        correspondence.reply(session, settings, ticket, text or "(see the attached files)", now=now,
                             actor=maintainer.name, attachments=attachments)
        outcome.done.append(
            f"sent your reply to the reporter{f' with {len(attachments)} attachment(s)' if attachments else ''}")
    log.info("event=maintainer-mail ticket=%s maintainer=%s done=%d refused=%d", ticket.reference,
             maintainer.email, len(outcome.done), len(outcome.refused))
    _confirm(session, settings, ticket, incoming, maintainer.email, outcome, now)


def _attachments(stored_raw: bytes, incoming: route.Incoming,
                 decryption: pgp_inbound.Decryption | None) -> tuple[composer.Attachment, ...]:
    found = []
    raw = pgp_inbound.opened_message(stored_raw, decryption)
    for attachment in incoming.mail.attachments:
        try:
            meta, data = extract_attachment(raw, attachment.index)
        except LookupError:
            continue
        found.append(composer.Attachment(meta.filename, meta.content_type, data))
    return tuple(found)


def _confirm(session: Session, settings: Settings, ticket: Ticket, incoming: route.Incoming, maintainer: str,
             outcome: mail_commands.Outcome, now: datetime) -> None:
    """Tell the maintainer what their mail did (automatic mail: no one answers it automatically)."""
    lines = [f"Your mail about {ticket.reference} was received."]
    lines += ["", "Done:", *(f"- {item}" for item in outcome.done)] if outcome.done else \
        ["", "Nothing was changed or sent."]
    lines += ["", "Refused:", *(f"- {item}" for item in outcome.refused)] if outcome.refused else []
    text = "\n".join(lines) + "\n" + (f"\n{mail_commands.help_text()}" if outcome.show_help else "")
    outbox.enqueue(session, composer.compose(
        MailKind.CONFIRMATION, sender=(settings.intake.from_name, ticket.intake_address), to=[maintainer],
        subject=f"Re: [{ticket.reference}] {composer.shorten(clean_text(ticket.subject))} (done)", text=text,
        ticket=ticket.reference, message_id_domain=settings.intake.message_id_domain, now=now,
        in_reply_to=incoming.mail.message_id, references=incoming.mail.references,
        automatic=composer.AUTO_REPLIED, encryption=reporter_keys.to_maintainer(settings, maintainer)),
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
    queued = outbox.enqueue(session, composer.notice(
        MailKind.REPLY_REFUSED, dedupe_key=f"refused:{ticket.reference}:{maintainer}:{now.date().isoformat()}",
        ticket=ticket.reference, subject=f"[{ticket.reference}] Your mail was refused: nothing changed",
        recipients=[maintainer], sender=(settings.intake.from_name, ticket.intake_address),
        reply_to=address, text=text, message_id_domain=settings.intake.message_id_domain, now=now,
        encryption=reporter_keys.to_maintainer(settings, maintainer)),
        ticket_id=ticket.id, now=now)
    log.info("event=maintainer-mail-refused ticket=%s maintainer=%s notified=%s", ticket.reference, maintainer,
             queued)


def maintainer_recipients(settings: Settings, ticket: Ticket) -> list[str]:
    """Who hears about a ticket: its assignee, else every maintainer."""
    if ticket.assignee:
        return [ticket.assignee]
    return [maintainer.email for maintainer in settings.maintainers]


def _proposal_lines(ticket: Ticket, proposed: date | None, third_party: bool, now: datetime) -> list[str]:
    """What a forwarded mail says about the disclosure date it proposes (see :mod:`intake.tickets.disclosure`)."""
    if proposed is None:
        return []
    why = "not from the reporter's address" if third_party else disclosure.not_taken_because(ticket, proposed, now)
    if why:
        return [f"It names a disclosure date, {proposed.isoformat()}: NOT recorded as the reporter's proposal ({why})."]
    return [f"The reporter proposes a disclosure date: {proposed.isoformat()} (recorded). Accept or counter with",
            f"`intake disclose-date {ticket.reference} DATE`, or #disclose-date DATE at the top of your reply."]


def _forward_to_maintainers(session: Session, settings: Settings, incoming: route.Incoming, decision: route.Decision,
                            now: datetime, secret: bytes, proposed: date | None) -> None:
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
                  *mail_commands.footer()]
    body = "\n".join([
        *intro,
        *_proposal_lines(ticket, proposed, third_party, now),
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
        outbox.enqueue(session, composer.compose(
            MailKind.THIRD_PARTY_FORWARD if third_party else MailKind.REPORTER_REPLY_FORWARD,
            sender=(f"{settings.intake.from_name} ({ticket.reference})", ticket.intake_address), to=[maintainer],
            subject=f"[{ticket.reference}] {what}: {composer.shorten(clean_text(mail.subject))}", text=body,
            ticket=ticket.reference, message_id_domain=settings.intake.message_id_domain, now=now,
            dedupe_key=f"forward:{ticket.reference}:{incoming.message_key}:{maintainer.lower()}",
            reply_to=None if third_party else reply_tokens.reply_address(secret, ticket.intake_address,
                                                                         ticket.reference, maintainer, now),
            automatic=composer.AUTO_GENERATED, encryption=reporter_keys.to_maintainer(settings, maintainer)),
            ticket_id=ticket.id, now=now)
