"""Held mail: ``intake messages`` lists the stored messages that made no ticket of their own (spam,
automatic replies, bounces, loops, rejected, duplicates, failed), ``intake messages show ID`` shows
one, ``intake promote ID`` makes a ticket of one. Everything a sender wrote goes through
:mod:`intake.display`, as ``intake show`` does."""

from __future__ import annotations

from datetime import datetime, timezone

import click

from intake.cli.common import INSTANT, JSON_OPTION, Context, actor, emit_json, fail, iso, record_read, table
from intake.cli.held import purge
from intake.display import echo
from intake.store import held_list, inbound, sealing
from intake.understand.header_text import display_value, scan_header_block
from intake.vocabulary import HELD, HELD_FAILED, AuditAction, InboundStatus

# Lines of a held message's text `intake messages show` prints (--json has it all).
_SHOWN_LINES = 200


@click.group(invoke_without_command=True)
@click.option("--decision", "decisions", multiple=True, type=click.Choice(HELD),
              help="Only messages of this decision (repeatable; failed: processing failed on them).")
@click.option("--since", type=INSTANT, default=None, help="Only messages received at or after this instant.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="List at most this many.")
@JSON_OPTION
@click.pass_context
def messages_group(ctx: click.Context, decisions: tuple[str, ...], since: datetime | None, limit: int,
                   as_json: bool) -> None:
    """Stored messages that made no ticket of their own, newest first (see `show`, `purge` and `intake promote`)."""
    if ctx.invoked_subcommand is not None:
        return
    obj: Context = ctx.obj
    held = held_list.held(obj.engine(), decisions or HELD, since, limit)
    if as_json:
        emit_json([message.as_dict() for message in held])
        return
    if not held:
        echo("no held messages")
        return
    table([[str(m.id), f"{m.received_at:%Y-%m-%d %H:%M}", m.mail_from or "<>", m.from_[:40], m.subject[:50],
            str(m.size), m.decision, m.reason[:60]] for m in held],
          ["ID", "RECEIVED", "ENVELOPE", "FROM", "SUBJECT", "SIZE", "DECISION", "REASON"])



messages_group.add_command(purge)  # `intake messages purge` (intake.cli.held)


@messages_group.command("show")
@click.argument("message_id", type=int)
@JSON_OPTION
@click.pass_obj
def show_message(obj: Context, message_id: int, as_json: bool) -> None:
    """Show stored message ID: its headers, text, attachments and why it was held."""
    from intake.understand import parse_guard, pgp_inbound  # the parser: only this command needs it

    engine = obj.engine()
    try:
        got = inbound.get(engine, message_id)
    except sealing.Shredded:
        fail(f"stored message {message_id}: its content was purged")
    if got is None:
        fail(f"no stored message {message_id}")
    row = got.message
    record_read(obj, engine, AuditAction.MESSAGE, ticket_id=row.ticket_id, message=message_id)
    settings = obj.settings
    try:
        parsed = parse_guard.parse_and_score(inbound.full_message(row.trace, got.raw), settings.quality_rules,
                                             settings.processing.parse_timeout, settings.processing.message_budget,
                                             pgp_inbound.decryption(settings))
    finally:
        parse_guard.close()
    mail = parsed.mail
    failed = row.status == InboundStatus.FAILED
    data = {
        "id": row.id, "received_at": iso(row.received_at), "mail_from": row.mail_from, "rcpt_tos": row.rcpt_tos,
        "size": row.size, "status": row.status, "decision": HELD_FAILED if failed else row.decision,
        "reason": (row.error if failed else row.reason) or "", "ticket_id": row.ticket_id,
        "peer": row.peer, "helo": row.helo, "relay": row.relay,
        "headers": [[name, display_value(value)]
                    for name, values in scan_header_block(inbound.full_message(row.trace, got.raw)).items()
                    for value in values],
        "text": mail.body_text, "attachments": [a.as_dict() for a in mail.attachments], "warnings": mail.warnings,
    }
    if as_json:
        emit_json(data)
        return
    echo(f"#{row.id}  received {data['received_at']}  {row.size} bytes  from <{row.mail_from}> "
         f"to {', '.join(row.rcpt_tos)}")
    echo(f"  {row.status}, decision {data['decision'] or '-'}: {data['reason']}")
    if row.relay:
        echo(f"  from {row.peer} ({row.helo or 'no HELO'}) via trusted relay {row.relay}")
    echo("\nHeaders:")
    for name, value in data["headers"]:
        echo(f"  {name}: {value}")
    echo("\nAttachments:" if mail.attachments else "\nAttachments: none")
    for attachment in mail.attachments:
        echo(f"  {attachment.index}: {attachment.original_filename or attachment.filename} "
             f"({attachment.content_type}, {attachment.size} bytes)")
    for warning in mail.warnings:
        echo(f"  warning: {warning}")
    echo("\nText:")
    lines = mail.body_text.strip().splitlines()
    for line in lines[:_SHOWN_LINES]:
        echo(f"  | {line}")
    if len(lines) > _SHOWN_LINES:
        echo(f"  ({len(lines) - _SHOWN_LINES} more lines: --json has them all)")


@click.command()
@click.argument("message_id", type=int)
@click.option("--no-ack", "no_ack", is_flag=True, help="Send the sender no acknowledgement.")
@click.pass_obj
def promote(obj: Context, message_id: int, no_ack: bool) -> None:
    """Make a ticket of held message ID, as if it had come in as a new report.

    The sender is acknowledged as a new reporter is (unless loop safety or the rate limit forbid
    it, or --no-ack). A message makes one ticket: promoting it again names that ticket and exits 0.
    A message that is pending or on a ticket processing made is refused (exit 1).
    """
    from intake.run import promotion
    from intake.understand import parse_guard

    settings = obj.settings
    try:
        done = promotion.promote(obj.engine(), settings, message_id, actor(settings), datetime.now(timezone.utc),
                                 acknowledge=not no_ack)
    except promotion.PromoteRefused as exc:
        fail(str(exc))
    finally:
        parse_guard.close()
    if done.already:
        echo(f"message {message_id} was promoted before: ticket {done.reference}")
        return
    echo(f"opened {done.reference} from message {message_id}; acknowledgement: {done.acknowledgement}")
