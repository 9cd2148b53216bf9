"""``intake tickets``, ``intake show`` and ``intake attachment``: reading tickets (through
:mod:`intake.tickets.reads`)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import click

from intake import display
from intake.cli.common import (
    JSON_OPTION, Context, emit_json, fail, iso, local_and_utc, record_read, table, write_file_or_fail,
)
from intake.display import echo
from intake.sla import deadlines
from intake.tickets import disclosure, reads, undeliverable
from intake.understand import credit_words
from intake.vocabulary import SEVERITIES, TICKET_STATES, AuditAction


def _ticket_summary(ticket: Any) -> dict[str, Any]:
    return {
        "reference": ticket.reference,
        "subject": ticket.subject,
        "reporter": ticket.reporter,
        "state": ticket.state,
        "severity": ticket.severity,
        "policy": ticket.policy,
        "assignee": ticket.assignee,
        "received_at": iso(ticket.received_at),
        "imported_at": iso(ticket.imported_at),
        "close_reason": ticket.close_reason,
        "cvss_vector": ticket.cvss_vector,
        "cvss_score": ticket.cvss_score,
    }


@click.command("tickets")
@click.option("--state", type=click.Choice(TICKET_STATES), default=None,
              help="Only tickets in this state (finished ones included).")
@click.option("--open/--all", "only_open", default=True,
              help="Only tickets with something left to meet (the default), or finished ones (resolved, closed) too.")
@click.option("--severity", type=click.Choice(SEVERITIES), default=None, help="Only tickets of this severity.")
@click.option("--assignee", default=None, help="Only tickets assigned to this maintainer (email, name or login).")
@click.option("--label", default=None, help="Only tickets with this label.")
@click.option("--policy", default=None, help="Only tickets under this policy.")
@click.option("--breached", is_flag=True, help="Only tickets with a stage past its due time.")
@click.option("--due-soon", "due_soon", is_flag=True, help="Only tickets with a stage due soon (policy's due_soon).")
@click.option("--sort", type=click.Choice(["due", "received"]), default="due", show_default=True,
              help="By next deadline (soonest first), or by receipt (oldest first).")
@JSON_OPTION
@click.pass_obj
def list_tickets(obj: Context, state: str | None, only_open: bool, severity: str | None, assignee: str | None,
                 label: str | None, policy: str | None, breached: bool, due_soon: bool, sort: str,
                 as_json: bool) -> None:
    """List tickets, by next deadline unless --sort received."""
    settings = obj.settings
    if assignee is not None:
        maintainer = settings.find_maintainer(assignee)
        assignee = maintainer.email if maintainer else assignee
    # Asking for a state is asking for it, finished or not.
    wanted = reads.TicketFilter(state, severity, assignee, label, policy, breached, due_soon,
                                finished=state is not None or not only_open)
    found = reads.find_tickets(obj.engine(), settings, wanted, datetime.now(timezone.utc), sort)
    if as_json:
        emit_json([{**_ticket_summary(item.ticket), "labels": item.ticket.labels,
                    "next_due": {"stage": item.next_stage, "due": iso(item.next_due)} if item.next_due else None,
                    "breached": item.breached, "due_soon": item.due_soon} for item in found])
        return
    if not found:
        echo("no tickets")
        return

    def due_text(item: reads.Listed) -> str:
        if item.next_due is None:
            return "-"
        flag = " BREACHED" if item.breached else " soon" if item.due_soon else ""
        return f"{item.next_stage} {item.next_due:%Y-%m-%d %H:%M}{flag}"

    table([[i.ticket.reference, i.ticket.state, i.ticket.severity or "-", due_text(i), i.ticket.assignee or "-",
            i.ticket.reporter, i.ticket.subject[:50]] for i in found],
          ["REFERENCE", "STATE", "SEVERITY", "NEXT DUE (UTC)", "ASSIGNEE", "REPORTER", "SUBJECT"])


@click.command()
@click.argument("reference")
@JSON_OPTION
@click.pass_obj
def show(obj: Context, reference: str, as_json: bool) -> None:
    """Show a ticket: its fields, deadlines, thread and events."""
    engine = obj.engine()
    try:
        detail = reads.ticket_detail(engine, reference)
    except reads.TicketNotFound:
        fail(f"no ticket {reference}")
    record_read(obj, engine, AuditAction.SHOW, ticket_id=detail.ticket.id)
    stages = deadlines.ticket_stage_statuses(engine, obj.settings, detail.ticket, datetime.now(timezone.utc))
    planned = disclosure.ticket_shown(engine, obj.settings, detail.ticket, datetime.now(timezone.utc))
    numbered = reads.numbered_attachments(detail)
    data = {
        **_ticket_summary(detail.ticket),
        "language": detail.ticket.language,
        "intake_address": detail.ticket.intake_address,
        "labels": detail.ticket.labels,
        "links": detail.ticket.links,
        "quality": detail.ticket.quality,
        "credit": detail.ticket.credit,
        "reporter_unreachable_at": iso(detail.ticket.reporter_unreachable_at),
        "content_purged_at": iso(detail.ticket.content_purged_at),
        "reporter_unreachable_reason": undeliverable.latest_reason(detail.events)
        if detail.ticket.reporter_unreachable_at else None,
        "stages": [stage.as_dict() for stage in stages],
        **planned.as_dict(),
        "thread": [
            {
                "direction": e.direction,
                "kind": e.kind,
                "sender": e.sender,
                "subject": e.subject,
                "message_id": e.message_id,
                "in_reply_to": e.in_reply_to,
                "at": iso(e.created_at),
                "threaded_by": e.threaded_by,
                "encrypted": e.encrypted,
                "pgp": e.pgp,
                "body": e.body_text,
                "attachments": [{**a, "number": numbered[(e.id, a["index"])]} for a in e.attachments],
                "warnings": e.warnings,
            }
            for e in detail.entries
        ],
        "events": [{"at": iso(e.at), "actor": e.actor, "kind": e.kind, "detail": e.detail} for e in detail.events],
        "messages": [{"id": m.id, "status": m.status, "decision": m.decision, "reason": m.reason,
                      "received_at": iso(m.received_at), "size": m.size, "error": m.error,
                      "authentication": m.authentication, "peer": m.peer, "helo": m.helo, "relay": m.relay}
                     for m in detail.messages],
    }
    if as_json:
        emit_json(data)
        return
    t = detail.ticket
    echo(f"{t.reference}  {t.subject or ('(content purged)' if t.content_purged_at else '')}")
    echo(f"  state {t.state}   severity {t.severity or '-'}   policy {t.policy}   assignee {t.assignee or '-'}")
    echo(f"  reporter {t.reporter_name + ' ' if t.reporter_name else ''}<{t.reporter}>  via {t.intake_address}"
         f"  language {t.language}")
    echo(f"  received {t.received_at.isoformat()}{_relayed_note(t, detail.messages)}")
    if t.imported_at:
        echo(f"  imported from history {t.imported_at.isoformat()}: nothing due before then is mailed about")
    if t.content_purged_at:
        echo(f"  content purged on {t.content_purged_at:%Y-%m-%d} ([retention] after_close): subject, thread text, "
             "attachments and stored mail erased")
    if t.reporter_unreachable_at:
        echo(f"  reporter unreachable since {t.reporter_unreachable_at.isoformat()}: "
             f"{data['reporter_unreachable_reason']}")
    if t.labels:
        echo(f"  labels {', '.join(t.labels)}")
    for link in t.links:
        echo(f"  {link['kind']} {link['reference']}")
    if t.credit:
        echo(f"  credit: {credit_words.Credit.from_dict(t.credit).display} (from {t.credit.get('source')})")
    if t.quality:
        matched = ", ".join(t.quality.get("matched", [])) or "no rule"
        echo(f"  quality score {t.quality.get('score')} (threshold {t.quality.get('threshold')}): {matched}")
    if planned.line():
        limit = f" (limit {planned.limit.latest.isoformat()}: {planned.limit.why})" if planned.limit else ""
        echo(f"  disclosure date: {planned.line()}{limit}")
    if stages:
        echo("\nDeadlines:")
        width = max(len(stage.stage) for stage in stages)
        for stage in stages:
            zone = (deadlines.stage_calendar(obj.settings, t.policy, stage.stage).zone
                    if t.policy in obj.settings.policies else ZoneInfo("UTC"))
            due = local_and_utc(stage.due_at, zone) if stage.due_at else "-"
            met = f", met {local_and_utc(stage.met_at, zone)}" if stage.met_at else ""
            echo(f"  {stage.stage.ljust(width)}  {stage.state:<9} due {due}{met}")
            echo(f"  {''.ljust(width)}  {stage.basis}")
    echo("\nThread:")
    for entry in data["thread"]:
        echo(f"  [{entry['at']}] {entry['direction']} {entry['kind']} from {entry['sender'] or '-'}"
             f"  {entry['message_id'] or ''}")
        if entry["threaded_by"]:
            echo(f"      threaded by {entry['threaded_by']}")
        if entry["encrypted"]:
            echo(f"      {_encryption_line(entry['encrypted'], entry['pgp'])}")
        for attachment in entry["attachments"]:
            if "filename" not in attachment:  # its content was purged: type and size only
                echo(f"      attachment {attachment['number']}: (purged) ({attachment['content_type']}, "
                     f"{attachment['size']} bytes)")
                continue
            echo(f"      attachment {attachment['number']}: {attachment['filename']} "
                 f"({attachment['content_type']}, {attachment['size']} bytes, sha256 {attachment['sha256'][:16]}…)")
        for warning in entry["warnings"]:
            echo(f"      warning: {warning}")
        if entry["body"]:
            for line in entry["body"].strip().splitlines()[:40]:
                echo(f"      | {line}")
    echo("\nMessages:")
    for message in data["messages"]:
        echo(f"  #{message['id']} [{message['received_at']}] {message['status']}, decision "
             f"{message['decision'] or '-'}: {message['reason'] or message['error'] or ''}")
        if message["relay"]:
            echo(f"      from {message['peer']} ({message['helo'] or 'no HELO'}) via trusted relay {message['relay']}")
        if message["authentication"]:
            echo(f"      sender {message['authentication']['result']}: {message['authentication']['reason']}")
    echo("\nEvents:")
    for event in data["events"]:
        detail_text = " ".join(f"{k}={v}" for k, v in event["detail"].items())
        echo(f"  [{event['at']}] {event['actor']}: {event['kind']} {detail_text}")


@click.command()
@click.argument("reference")
@click.argument("number", type=click.IntRange(min=1))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write (created with mode 0600), or - for standard output.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (never a symbolic link).")
@click.pass_obj
def attachment(obj: Context, reference: str, number: int, output: str, force: bool) -> None:
    """Write attachment NUMBER of ticket REFERENCE (as numbered by `intake show`) to a file.

    The bytes are the attachment exactly as received, decoded from its transfer encoding;
    archives are never unpacked. Open it somewhere safe: it came from a stranger.
    """
    from intake.tickets import attachments  # the parser: only this command needs it
    from intake.understand import pgp_inbound

    try:
        engine = obj.engine()
        meta, data = attachments.read(engine, reference, number, pgp_inbound.decryption(obj.settings))
    except reads.TicketNotFound:
        fail(f"no ticket {reference}")
    except attachments.AttachmentMissing as exc:
        fail(str(exc))
    record_read(obj, engine, AuditAction.ATTACHMENT, reference=reference, number=number, sha256=meta.sha256)
    if output == "-":
        try:
            echo(data, nl=False)  # bytes go to the binary stream, unchanged
        except display.TerminalRefused:
            fail("standard output is a terminal, which a stranger's bytes could drive: "
                 "give a file name, or pipe it (-o - | less)")
        return
    write_file_or_fail(output, data, force)
    echo(f"wrote {len(data)} bytes to {output} ({meta.content_type}, sha256 {meta.sha256}; "
         f"sent as {meta.original_filename or meta.filename!r})", err=True)


def _relayed_note(ticket: Any, messages: list[Any]) -> str:
    """How the ticket's received time relates to intake's, when its report came through a trusted
    relay: the SLA starts when the relay accepted it, which may be well before intake got it."""
    report = messages[0] if messages else None  # the first message stored for it: its report
    if report is None or not report.relay or report.received_at == ticket.received_at:
        return ""
    return f" (relay accepted it; intake got it {report.received_at.isoformat()})"


def _encryption_line(kind: str, pgp: dict | None) -> str:
    """How `intake show` states that an entry came encrypted, whether it was decrypted, and its signature."""
    if not pgp or not pgp.get("decrypted"):
        return f"received encrypted ({kind}), not decrypted: ciphertext kept as received (see the warnings)"
    line = f"received encrypted ({kind}), decrypted; ciphertext kept as received"
    if not pgp.get("signed"):
        return line + "; not signed"
    if pgp.get("verified"):
        return line + f"; signed by {pgp['signer']}, verified against the {pgp['verified_with']}"
    return line + f"; signed by key {pgp['signer'] or '(unnamed)'}, NOT verified (no key of it on file or attached)"
