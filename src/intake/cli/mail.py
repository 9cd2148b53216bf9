"""Commands about mail: reply and note (correspondence on a ticket), the outbox, reprocessing
stored messages, the SLA sweep, digests and a ticket's reminders."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from intake.cli.common import JSON_OPTION, NOW_OPTION, Context, actor, change_ticket, emit_json, fail, iso, table
from intake.display import echo
from intake.run import processor
from intake.send import outbox
from intake.sla import digest, mail_listing, reminders
from intake.store import inbound
from intake.tickets import correspondence, reads
from intake.understand import parse_guard
from intake.vocabulary import Audience, DigestStatus, OutboxStatus


def _message_text(message: str | None, file: Path | None, reference: str, what: str) -> str:
    """The text from --message, --file (- for stdin) or, failing both, $EDITOR."""
    if message is not None and file is not None:
        raise click.UsageError("give --message or --file, not both")
    if message is not None:
        return message
    if file is not None:
        return sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    edited = click.edit(f"\n# Write your {what} for {reference} above. Lines starting with '#' are dropped;\n"
                        "# an empty message sends nothing.\n", extension=".txt", require_save=True)
    if edited is None:
        return ""
    return "\n".join(line for line in edited.splitlines() if not line.startswith("#"))


_MESSAGE = click.option("--message", "-m", default=None, help="The text (else --file, else $EDITOR).")
_FILE = click.option("--file", "-f", "file", type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
                     default=None, help="Read the text from FILE (- for standard input).")


@click.command()
@click.argument("reference")
@_MESSAGE
@_FILE
@click.option("--cc", multiple=True, help="Also send to this address (a co-ordinator; repeatable).")
@click.pass_obj
def reply(obj: Context, reference: str, message: str | None, file: Path | None, cc: tuple[str, ...]) -> None:
    """Reply to the reporter from the intake address (counts as the human acknowledgement)."""
    text = _message_text(message, file, reference, "reply")

    def change(session, settings, ticket, now):  # type: ignore[no-untyped-def]
        sent = correspondence.reply(session, settings, ticket, text, now=now, actor=actor(settings), cc=cc)
        return [], [f"reply queued to {', '.join(sent.recipients)} ({sent.message_id})"]

    change_ticket(obj, reference, change)


@click.command()
@click.argument("reference")
@_MESSAGE
@_FILE
@click.pass_obj
def note(obj: Context, reference: str, message: str | None, file: Path | None) -> None:
    """Add an internal note to the ticket; it is never sent."""
    text = _message_text(message, file, reference, "note")

    def change(session, settings, ticket, now):  # type: ignore[no-untyped-def]
        correspondence.note(session, ticket, text, now=now, actor=actor(settings))
        return [], ["note added (internal, not sent)"]

    change_ticket(obj, reference, change)


@click.command("outbox")
@click.option("--status", type=click.Choice([OutboxStatus.PENDING, OutboxStatus.SENT, OutboxStatus.DEAD]),
              default=None)
@JSON_OPTION
@click.pass_obj
def outbox_command(obj: Context, status: str | None, as_json: bool) -> None:
    """Mail queued, sent and dead, newest first."""
    rows = outbox.listing(obj.engine(), status)
    data = [{"id": r.id, "key": r.dedupe_key, "kind": r.kind, "status": r.status, "to": r.recipients,
             "message_id": r.message_id, "attempts": r.attempts, "created_at": iso(r.created_at),
             "next_attempt_at": iso(r.next_attempt_at) if r.status == OutboxStatus.PENDING else None,
             "sent_at": iso(r.sent_at), "last_error": r.last_error} for r in rows]
    if as_json:
        emit_json(data)
        return
    if not data:
        echo("outbox is empty")
        return
    table([[str(d["id"]), d["status"], str(d["attempts"]), d["key"], ",".join(d["to"]),
            (d["last_error"] or "")[:60]] for d in data], ["ID", "STATUS", "TRIES", "KEY", "TO", "LAST ERROR"])


@click.command()
@click.argument("message_id", required=False, type=int)
@click.option("--failed", "all_failed", is_flag=True, help="Every message that failed processing.")
@click.pass_obj
def reprocess(obj: Context, message_id: int | None, all_failed: bool) -> None:
    """Run failed (or ignored) stored messages through processing again."""
    if (message_id is None) == (not all_failed):
        raise click.UsageError("give a stored message ID or --failed (not both)")
    engine = obj.engine()
    if all_failed:
        ids = inbound.failed_ids(engine)
    else:
        if inbound.get(engine, message_id) is None:
            fail(f"no stored message {message_id}")
        ids = [message_id]
    requeued = inbound.requeue(engine, ids)
    if not requeued:
        echo("nothing to reprocess" if all_failed else f"message {message_id} is not failed or ignored")
        return
    try:
        result = processor.process_all(engine, obj.settings, datetime.now(timezone.utc))
    finally:
        parse_guard.close()
    for ref in result.tickets_opened:
        echo(f"opened {ref}")
    for kind, count in sorted(result.decisions.items()):
        echo(f"{kind}: {count}")
    if result.failed:
        fail(f"still failing: {', '.join(map(str, result.failed))} (see the log for the error)")


@click.command()
@NOW_OPTION
@click.option("--dry-run", is_flag=True, help="List what would be sent; send and record nothing.")
@JSON_OPTION
@click.pass_obj
def sweep(obj: Context, now: datetime | None, dry_run: bool, as_json: bool) -> None:
    """Run one SLA sweep: reminders, breach notices, escalations and keep-in-loop mail due at --now, each sent once."""
    result = reminders.sweep(obj.engine(), obj.settings, now or datetime.now(timezone.utc), dry_run=dry_run)
    if as_json:
        emit_json(result.as_dict())
        return
    verb = "would send" if dry_run else "queued"
    echo(f"sweep at {result.now.isoformat()}: {verb} {len(result.mails)} mail(s) to maintainers, "
         f"{len(result.keep_in_loop)} keep-in-loop mail(s) to reporters; "
         f"{result.examined} stage(s) looked at, {result.held} reminder(s) held for working hours")
    if result.suppressed:
        tickets = len({notice.ticket_id for notice in result.suppressed})
        echo(f"  {len(result.suppressed)} notice(s) of {tickets} imported ticket(s) not mailed: they fell due "
             "before the import (see intake reminders REF)")
    for mail in result.mails:
        echo(f"  {mail.reference} {mail.kind} to {', '.join(mail.recipients)}")
        for notice in mail.notices:
            echo(f"    {notice.stage} {notice.label} (at {notice.at.isoformat()})  {notice.key}")
    for planned in result.keep_in_loop:
        echo(f"  {planned.reference} keep-in-loop to {planned.reporter} (no mail to them since "
             f"{planned.silent_since.isoformat()}), maintainers told: {', '.join(planned.maintainers) or 'none'}")


@click.command("digest")
@click.argument("name")
@NOW_OPTION
@click.option("--preview", is_flag=True, help="Print the digest; send and record nothing.")
@click.option("--send", is_flag=True, help="Send it for its period, unless sent already (or empty).")
@JSON_OPTION
@click.pass_obj
def digest_command(obj: Context, name: str, now: datetime | None, preview: bool, send: bool, as_json: bool) -> None:
    """Preview or send digest NAME (a [scheduler.digests.NAME] schedule) as of --now."""
    if preview == send:
        raise click.UsageError("give --preview or --send (one of them)")
    settings, now = obj.settings, now or datetime.now(timezone.utc)
    try:
        if preview:
            built = digest.build(obj.engine(), settings, name, now)
            status = "preview"
        else:
            outcome = digest.send(obj.engine(), settings, name, now)
            built, status = outcome.digest, outcome.status
    except digest.DigestNotFound as exc:
        fail(str(exc))
    if as_json:
        emit_json({"status": status, **built.as_dict()})
    elif preview:
        echo(digest.text(settings, built), nl=False)
    else:
        echo({DigestStatus.SENT: f"digest {name} for {built.period.isoformat()} queued ({built.key})",
              DigestStatus.ALREADY_SENT: f"digest {name} for {built.period.isoformat()} was sent already ({built.key})",
              DigestStatus.EMPTY: f"digest {name} for {built.period.isoformat()} is empty: not sent (send_empty = false)",
              DigestStatus.NO_RECIPIENTS: f"digest {name}: no recipients and no [[maintainers]]: not sent"}[status])
    if status == DigestStatus.NO_RECIPIENTS:
        sys.exit(1)


@click.command("reminders")
@click.argument("reference")
@NOW_OPTION
@JSON_OPTION
@click.pass_obj
def reminders_command(obj: Context, reference: str, now: datetime | None, as_json: bool) -> None:
    """What was sent for ticket REFERENCE, to maintainers and to the reporter, and what comes next."""
    try:
        found = mail_listing.ticket_mail(obj.engine(), obj.settings, reference, now or datetime.now(timezone.utc))
    except reads.TicketNotFound:
        fail(f"no ticket {reference}")
    data = found.as_dict()
    if as_json:
        emit_json(data)
        return

    def to(entry: dict) -> str:  # type: ignore[type-arg]
        return f"to {entry['audience']}:"

    echo(f"{found.maintainers.reference}: sent")
    if not data["sent"]:
        echo("  nothing yet")
    for sent in data["sent"]:
        echo("  " + " ".join(filter(None, [to(sent), sent["kind"], sent.get("stage"), sent.get("point"),
                                           sent.get("queued_at") and f"queued {sent['queued_at']}",
                                           sent.get("to") and "to " + ", ".join(sent["to"]),
                                           sent.get("status") and f"({sent['status']})"])))
    if found.maintainers.suppressed:
        echo(f"suppressed (imported from history at {data['imported_at']}; never mailed)")
    for item in found.maintainers.suppressed:
        echo(f"  to {Audience.MAINTAINERS}: {item.stage} {item.point} (at {item.at.isoformat()}): {item.why}")
    if found.withheld:
        echo("not sent to the reporter")
    for mail in found.withheld:
        what = " ".join(filter(None, [mail.kind, mail.what]))
        echo(f"  to {Audience.REPORTER}: {what} (at {mail.at.isoformat()}): {mail.why}")
    echo("due now (the next sweep sends it)" if data["due_now"] else "due now: nothing")
    for item in data["due_now"]:
        echo(f"  {to(item)} {' '.join(filter(None, [item['stage'], item['kind'], item['point']]))} (at {item['at']})")
    echo("next")
    if not data["next"]:
        echo("  nothing scheduled")
    for item in data["next"]:
        words = " ".join(filter(None, [item["stage"], item["kind"], item["point"], item["at"] and "at " + item["at"]]))
        echo(f"  {to(item)} {words}")
    if found.keep_in_loop_why_not:
        echo(f"  to {Audience.REPORTER}: no keep-in-loop mail ({found.keep_in_loop_period} without mail): "
             f"{found.keep_in_loop_why_not}")
