"""The operator CLI. Every command calls the same service functions the service uses.

Exit status: 0 success, 1 the thing asked for failed or was not found, 2 usage error,
78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

from intake.store import backup as backups
from intake import display
from intake.store import private_files
from intake.understand import reply_tokens
from intake.tickets import correspondence
from intake.tickets import credit
from intake.sla import deadlines
from intake.sla import digest
from intake.store import inbound
from intake.tickets import milestones
from intake.send import outbox
from intake.understand import parse_guard
from intake.run import processor
from intake.sla import reminders
from intake.store import schema
from intake.run import service
from intake.tickets import core as tickets
from intake.tickets import triage
from intake.config.settings import EXIT_CONFIG
from intake.config.settings import ConfigError
from intake.config.settings import Settings
from intake.config.settings import default_config_path
from intake.config.settings import load_settings
from intake.store.db import is_sqlite
from intake.store.db import make_engine
from intake.store.db import write_session
from intake.display import echo
from intake.understand.content import extract_attachment
from intake.vocabulary import CLOSE_REASONS, SEVERITIES, DigestStatus, Milestone, OutboxStatus


class Context:
    def __init__(self, config_path: Path | None):
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config_path)
            except ConfigError as exc:
                echo(f"intake: configuration error in {self.config_path or default_config_path()}:\n{exc}",
                           err=True)
                sys.exit(EXIT_CONFIG)
        return self._settings

    def engine(self, *, at_head: bool = True):  # type: ignore[no-untyped-def]
        """The database; unless *at_head* is False, one whose schema this intake can use.
        Only `intake serve` and `intake db upgrade` migrate."""
        engine = make_engine(self.settings.database_url, self.settings.database.busy_timeout)
        if at_head:
            try:
                schema.require_current(engine)
            except schema.SchemaRefused as exc:
                _fail(str(exc))
        return engine


def _fail(message: str, code: int = 1) -> None:
    echo(f"intake: {message}", err=True)
    sys.exit(code)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _emit_json(data: Any) -> None:
    display.echo_json(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    for line in [headers, *rows]:
        echo("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())


@click.group()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Config file (default: $INTAKE_CONFIG, else ./config.toml).")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """intake: the security@ mailbox as tracked tickets."""
    ctx.obj = Context(config_path)


@main.command()
@click.pass_obj
def serve(obj: Context) -> None:
    """Run the SMTP listener, processor and outbox until SIGTERM."""
    service.configure_logging(obj.settings.logging)
    sys.exit(service.serve(obj.settings))


@main.command("check-config")
@click.pass_obj
def check_config(obj: Context) -> None:
    """Validate the configuration: exit 0, or 78 naming the bad key."""
    settings = obj.settings
    echo(f"{settings.config_path}: OK ({len(settings.policies)} policies, "
               f"listening on {settings.smtp.listen}, outbound via {settings.outbound.transport})")
    for warning in cli_reports.check_config_warnings(obj):
        echo(f"intake: warning: {warning}", err=True)


def _ticket_summary(ticket: Any) -> dict[str, Any]:
    return {
        "reference": ticket.reference,
        "subject": ticket.subject,
        "reporter": ticket.reporter,
        "state": ticket.state,
        "severity": ticket.severity,
        "policy": ticket.policy,
        "assignee": ticket.assignee,
        "received_at": _iso(ticket.received_at),
        "close_reason": ticket.close_reason,
        "cvss_vector": ticket.cvss_vector,
        "cvss_score": ticket.cvss_score,
    }


@main.command("tickets")
@click.option("--state", default=None, help="Only tickets in this state (new, waiting, assessed, closed, ...).")
@click.option("--severity", type=click.Choice(SEVERITIES), default=None, help="Only tickets of this severity.")
@click.option("--assignee", default=None, help="Only tickets assigned to this maintainer (email, name or login).")
@click.option("--label", default=None, help="Only tickets with this label.")
@click.option("--policy", default=None, help="Only tickets under this policy.")
@click.option("--breached", is_flag=True, help="Only tickets with a stage past its due time.")
@click.option("--due-soon", "due_soon", is_flag=True, help="Only tickets with a stage due soon (policy's due_soon).")
@click.option("--sort", type=click.Choice(["due", "received"]), default="due", show_default=True,
              help="By next deadline (soonest first), or by receipt (oldest first).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def list_tickets(obj: Context, state: str | None, severity: str | None, assignee: str | None, label: str | None,
                 policy: str | None, breached: bool, due_soon: bool, sort: str, as_json: bool) -> None:
    """List tickets, by next deadline unless --sort received."""
    settings = obj.settings
    if assignee is not None:
        maintainer = settings.find_maintainer(assignee)
        assignee = maintainer.email if maintainer else assignee
    wanted = tickets.TicketFilter(state, severity, assignee, label, policy, breached, due_soon)
    found = tickets.find_tickets(obj.engine(), settings, wanted, datetime.now(timezone.utc), sort)
    if as_json:
        _emit_json([{**_ticket_summary(item.ticket), "labels": item.ticket.labels,
                     "next_due": {"stage": item.next_stage, "due": _iso(item.next_due)} if item.next_due else None,
                     "breached": item.breached, "due_soon": item.due_soon} for item in found])
        return
    if not found:
        echo("no tickets")
        return

    def due_text(item: tickets.Listed) -> str:
        if item.next_due is None:
            return "-"
        flag = " BREACHED" if item.breached else " soon" if item.due_soon else ""
        return f"{item.next_stage} {item.next_due:%Y-%m-%d %H:%M}{flag}"

    _table([[i.ticket.reference, i.ticket.state, i.ticket.severity or "-", due_text(i), i.ticket.assignee or "-",
             i.ticket.reporter, i.ticket.subject[:50]] for i in found],
           ["REFERENCE", "STATE", "SEVERITY", "NEXT DUE (UTC)", "ASSIGNEE", "REPORTER", "SUBJECT"])


@main.command()
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def show(obj: Context, reference: str, as_json: bool) -> None:
    """Show a ticket: its fields, deadlines, thread and events."""
    engine = obj.engine()
    try:
        detail = tickets.ticket_detail(engine, reference)
    except tickets.TicketNotFound:
        _fail(f"no ticket {reference}")
        return
    stages = deadlines.ticket_stage_statuses(engine, obj.settings, detail.ticket, datetime.now(timezone.utc))
    numbered = _numbered_attachments(detail)
    data = {
        **_ticket_summary(detail.ticket),
        "intake_address": detail.ticket.intake_address,
        "labels": detail.ticket.labels,
        "links": detail.ticket.links,
        "quality": detail.ticket.quality,
        "credit": detail.ticket.credit,
        "reporter_unreachable_at": _iso(detail.ticket.reporter_unreachable_at),
        "stages": [stage.as_dict() for stage in stages],
        "thread": [
            {
                "direction": e.direction,
                "kind": e.kind,
                "sender": e.sender,
                "subject": e.subject,
                "message_id": e.message_id,
                "in_reply_to": e.in_reply_to,
                "at": _iso(e.created_at),
                "threaded_by": e.threaded_by,
                "encrypted": e.encrypted,
                "body": e.body_text,
                "attachments": [{**a, "number": numbered[(e.id, a["index"])]} for a in e.attachments],
                "warnings": e.warnings,
            }
            for e in detail.entries
        ],
        "events": [{"at": _iso(e.at), "actor": e.actor, "kind": e.kind, "detail": e.detail} for e in detail.events],
        "messages": [{"id": m.id, "status": m.status, "decision": m.decision, "reason": m.reason,
                      "received_at": _iso(m.received_at), "size": m.size, "error": m.error,
                      "authentication": m.authentication}
                     for m in detail.messages],
    }
    if as_json:
        _emit_json(data)
        return
    t = detail.ticket
    echo(f"{t.reference}  {t.subject}")
    echo(f"  state {t.state}   severity {t.severity or '-'}   policy {t.policy}   assignee {t.assignee or '-'}")
    echo(f"  reporter {t.reporter_name + ' ' if t.reporter_name else ''}<{t.reporter}>  via {t.intake_address}")
    echo(f"  received {t.received_at.isoformat()}")
    if t.reporter_unreachable_at:
        echo(f"  reporter unreachable since {t.reporter_unreachable_at.isoformat()} (our mail bounced)")
    if t.labels:
        echo(f"  labels {', '.join(t.labels)}")
    for link in t.links:
        echo(f"  {link['kind']} {link['reference']}")
    if t.credit:
        echo(f"  credit: {credit.Credit.from_dict(t.credit).display} (from {t.credit.get('source')})")
    if t.quality:
        matched = ", ".join(t.quality.get("matched", [])) or "no rule"
        echo(f"  quality score {t.quality.get('score')} (threshold {t.quality.get('threshold')}): {matched}")
    if stages:
        echo("\nDeadlines:")
        width = max(len(stage.stage) for stage in stages)
        for stage in stages:
            zone = deadlines.stage_calendar(obj.settings, t.policy, stage.stage).zone if t.policy in obj.settings.policies else ZoneInfo("UTC")
            due = _local_and_utc(stage.due_at, zone) if stage.due_at else "-"
            met = f", met {_local_and_utc(stage.met_at, zone)}" if stage.met_at else ""
            echo(f"  {stage.stage.ljust(width)}  {stage.state:<9} due {due}{met}")
            echo(f"  {''.ljust(width)}  {stage.basis}")
    echo("\nThread:")
    for entry in data["thread"]:
        echo(f"  [{entry['at']}] {entry['direction']} {entry['kind']} from {entry['sender'] or '-'}"
                   f"  {entry['message_id'] or ''}")
        if entry["threaded_by"]:
            echo(f"      threaded by {entry['threaded_by']}")
        if entry["encrypted"]:
            echo(f"      encrypted ({entry['encrypted']}): ciphertext kept as received")
        for attachment in entry["attachments"]:
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
        if message["authentication"]:
            echo(f"      sender {message['authentication']['result']}: {message['authentication']['reason']}")
    echo("\nEvents:")
    for event in data["events"]:
        detail_text = " ".join(f"{k}={v}" for k, v in event["detail"].items())
        echo(f"  [{event['at']}] {event['actor']}: {event['kind']} {detail_text}")


def _numbered_attachments(detail: tickets.TicketDetail) -> dict[tuple[int, int], int]:
    """Ticket-wide attachment numbers (1, 2, …) in thread order: what `intake attachment REF N` takes."""
    keys = [(entry.id, a["index"]) for entry in detail.entries for a in entry.attachments]
    return {key: number for number, key in enumerate(keys, start=1)}


@main.command()
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
    engine = obj.engine()
    try:
        detail = tickets.ticket_detail(engine, reference)
    except tickets.TicketNotFound:
        _fail(f"no ticket {reference}")
        return
    located = {n: key for key, n in _numbered_attachments(detail).items()}
    if number not in located:
        _fail(f"{detail.ticket.reference} has {len(located)} attachment(s); there is no number {number}")
    entry_id, index = located[number]
    entry = next(e for e in detail.entries if e.id == entry_id)
    stored = inbound.get(engine, entry.inbound_id) if entry.inbound_id else None
    if stored is None:
        _fail(f"the stored message of attachment {number} is gone")
        return
    try:
        meta, data = extract_attachment(stored.raw, index)
    except LookupError:  # the parser no longer finds it where it was numbered: say so, write nothing
        _fail(f"attachment {number} can no longer be read from stored message {stored.id}")
        return
    if output == "-":
        try:
            echo(data, nl=False)  # bytes go to the binary stream, unchanged
        except display.TerminalRefused:
            _fail("standard output is a terminal, which a stranger's bytes could drive: "
                  "give a file name, or pipe it (-o - | less)")
        return
    try:
        private_files.write_private(Path(output), data, replace=force)
    except FileExistsError:
        _fail(f"{output} exists (use --force to overwrite)")
        return
    except private_files.SymlinkRefused as exc:
        _fail(f"{exc}: give another file name")
        return
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror}")
        return
    echo(f"wrote {len(data)} bytes to {output} ({meta.content_type}, sha256 {meta.sha256}; "
               f"sent as {meta.original_filename or meta.filename!r})", err=True)


@main.command()
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
            _fail(f"no stored message {message_id}")
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
        _fail(f"still failing: {', '.join(map(str, result.failed))} (see the log for the error)")


@main.command("outbox")
@click.option("--status", type=click.Choice([OutboxStatus.PENDING, OutboxStatus.SENT, OutboxStatus.DEAD]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def outbox_command(obj: Context, status: str | None, as_json: bool) -> None:
    """Mail queued, sent and dead, newest first."""
    rows = outbox.listing(obj.engine(), status)
    data = [{"id": r.id, "key": r.dedupe_key, "kind": r.kind, "status": r.status, "to": r.recipients,
             "message_id": r.message_id, "attempts": r.attempts, "created_at": _iso(r.created_at),
             "next_attempt_at": _iso(r.next_attempt_at) if r.status == OutboxStatus.PENDING else None,
             "sent_at": _iso(r.sent_at), "last_error": r.last_error} for r in rows]
    if as_json:
        _emit_json(data)
        return
    if not data:
        echo("outbox is empty")
        return
    _table([[str(d["id"]), d["status"], str(d["attempts"]), d["key"], ",".join(d["to"]),
             (d["last_error"] or "")[:60]] for d in data], ["ID", "STATUS", "TRIES", "KEY", "TO", "LAST ERROR"])


# -- SLA: policies explained, deadlines recomputed ---------------------------------------------


class _Instant(click.ParamType):
    """An ISO 8601 instant with a UTC offset (``Z`` or ``+10:00``): a bare local time is ambiguous."""

    name = "ISO8601"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            instant = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date and time (e.g. 2026-12-24T15:00:00+10:00)", param, ctx)
        if instant.utcoffset() is None:
            self.fail(f"{value!r} has no UTC offset: add one, e.g. {value}Z or {value}+10:00", param, ctx)
        return instant


INSTANT = _Instant()


def _local_and_utc(instant: datetime, zone: ZoneInfo) -> str:
    local = instant.astimezone(zone)
    offset = local.isoformat()[-6:]
    return f"{local:%a %d %b %Y %H:%M} {local.tzname()} ({offset}) = {instant.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"


@main.group()
def sla() -> None:
    """SLA deadlines: explain a policy, recompute the stored deadlines."""


@sla.command("explain")
@click.option("--policy", "policy_name", required=True, help="Policy name from the config.")
@click.option("--received", required=True, type=INSTANT, help="When the report was received (ISO 8601 with offset).")
@click.option("--severity", type=click.Choice(SEVERITIES), default=None,
              help="Severity, if known (else severity-dependent stages take their strictest duration).")
@click.option("--released", type=INSTANT, default=None, help="When the patched release came out.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def sla_explain(obj: Context, policy_name: str, received: datetime, severity: str | None,
                released: datetime | None, as_json: bool) -> None:
    """Every stage's due instant for a report received at --received, and why."""
    settings = obj.settings
    if policy_name not in settings.policies:
        _fail(f"no policy {policy_name!r} (known: {', '.join(sorted(settings.policies))})", 2)
    inputs = deadlines.SlaInputs(received, severity, {Milestone.RELEASED: released} if released else {}, None, [])
    computed = deadlines.compute(settings, policy_name, inputs)
    stages = []
    for deadline, _ in computed:
        zone = deadlines.stage_calendar(settings, policy_name, deadline.stage).zone
        stages.append({"stage": deadline.stage,
                       "due": deadline.due.astimezone(zone).isoformat() if deadline.due else None,
                       "due_utc": deadline.due.astimezone(timezone.utc).isoformat() if deadline.due else None,
                       "timezone": zone.key, "basis": deadline.basis,
                       "severity_assumed": deadline.severity_assumed})
    if as_json:
        _emit_json({"policy": policy_name, "received": received.isoformat(), "severity": severity,
                    Milestone.RELEASED: _iso(released), "stages": stages})
        return
    policy = settings.policies[policy_name]
    echo(f"policy {policy_name}{': ' + policy.description if policy.description else ''}")
    echo(f"received {_local_and_utc(received, settings.all_calendars[policy.calendar].zone)}"
               f"{', severity ' + severity if severity else ', severity not known'}")
    width = max(len(stage["stage"]) for stage in stages)
    for stage, (deadline, _) in zip(stages, computed):
        when = _local_and_utc(deadline.due, ZoneInfo(stage["timezone"])) if deadline.due else "not started"
        echo(f"  {stage['stage'].ljust(width)}  {when}")
        echo(f"  {''.ljust(width)}  {stage['basis']}")


@sla.command("recompute")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def sla_recompute(obj: Context, as_json: bool) -> None:
    """Recompute every ticket's stored deadlines from the policies now in the config."""
    result = deadlines.recompute_all(obj.engine(), obj.settings, datetime.now(timezone.utc))
    changes = [{"reference": c.reference, "stage": c.stage, "due_before": _iso(c.due_before),
                "due_after": _iso(c.due_after), "met_before": _iso(c.met_before), "met_after": _iso(c.met_after)}
               for c in result.changes]
    if as_json:
        _emit_json({"tickets": result.tickets, "changes": changes, "errors": result.errors})
    else:
        echo(f"recomputed {result.tickets} ticket(s): {len(changes)} deadline(s) changed")
        for change in changes:
            echo(f"  {change['reference']} {change['stage']}: due {change['due_before'] or '-'} -> "
                       f"{change['due_after'] or '-'}")
        for reference, error in result.errors.items():
            echo(f"  {reference}: not recomputed: {error}", err=True)
    if result.errors:
        sys.exit(1)


# -- milestones and waiting on the reporter ----------------------------------------------------


def _actor(settings: Settings) -> str:
    """Who is at the keyboard, recorded with every change: the maintainer whose ``login`` is $USER,
    else $USER itself."""
    return settings.actor(os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown")


def _change_ticket(obj: Context, reference: str, change: Any) -> None:
    """Run *change(session, settings, ticket, now)* on one ticket in one transaction and report it.

    *change* returns the deadlines it moved, or ``(moved, notes)`` with lines to show as well."""
    settings = obj.settings
    now = datetime.now(timezone.utc)
    try:
        with write_session(obj.engine()) as session:
            ticket = tickets.find(session, reference)
            result = change(session, settings, ticket, now)
            summary = f"{ticket.reference}: state {ticket.state}"
    except tickets.TicketNotFound as exc:
        _fail(f"no ticket {exc.args[0]}")
        return
    except (milestones.Refused, deadlines.PolicyMissing, correspondence.EmptyMessage) as exc:
        _fail(f"{exc}")
        return
    moved, notes = result if isinstance(result, tuple) else (result or [], [])
    echo(summary)
    for note_text in notes:
        echo(f"  {note_text}")
    for item in moved:
        if item.due_before != item.due_after:
            echo(f"  {item.stage} due {_iso(item.due_before) or '-'} -> {_iso(item.due_after) or '-'}")
        if item.met_before != item.met_after:
            echo(f"  {item.stage} met {_iso(item.met_after) or '-'}")


_AT = click.option("--at", type=INSTANT, default=None, help="When it happened (ISO 8601 with offset; default now).")
_FORCE = click.option("--force", is_flag=True, help="Record it even out of order or a second time.")


def _milestone_command(name: str, milestone: str, help_text: str) -> None:
    @main.command(name, help=help_text)
    @click.argument("reference")
    @_AT
    @_FORCE
    @click.pass_obj
    def command(obj: Context, reference: str, at: datetime | None, force: bool) -> None:
        _change_ticket(obj, reference, lambda session, settings, ticket, now: milestones.record(
            session, settings, ticket, milestone, at=at or now, now=now, actor=_actor(settings), force=force))


def _ticket_command(name: str, change: Any, help_text: str) -> None:
    """A command that makes one change to ticket REFERENCE: *change(session, settings, ticket, now=, actor=)*."""
    @main.command(name, help=help_text)
    @click.argument("reference")
    @click.pass_obj
    def command(obj: Context, reference: str) -> None:
        _change_ticket(obj, reference, lambda session, settings, ticket, now: change(
            session, settings, ticket, now=now, actor=_actor(settings)))


_ticket_command("wait", milestones.wait, "The ticket waits on the reporter (clocks stop where the policy says so).")
_ticket_command("resume", milestones.resume, "The ticket no longer waits on the reporter.")
_ticket_command("reopen", triage.reopen, "Reopen a closed or resolved ticket.")
_milestone_command("ack", Milestone.ACKNOWLEDGED, "Record that a person acknowledged the report to the reporter.")
_milestone_command("resolve", Milestone.RESOLVED, "Record that the report is resolved.")
_milestone_command("disclose", Milestone.DISCLOSED, "Record that the vulnerability was disclosed publicly.")


@main.command()
@click.argument("reference")
@click.option("--severity", required=True, type=click.Choice(SEVERITIES), help="The assessed severity.")
@_AT
@_FORCE
@click.pass_obj
def assess(obj: Context, reference: str, severity: str, at: datetime | None, force: bool) -> None:
    """Record the assessment of the report, with its severity."""
    _change_ticket(obj, reference, lambda session, settings, ticket, now: milestones.assess(
        session, settings, ticket, severity, at=at or now, now=now, actor=_actor(settings), force=force))


@main.command()
@click.argument("reference")
@_AT
@click.option("--version", "version", default=None, help="The release that carries the fix.")
@_FORCE
@click.pass_obj
def released(obj: Context, reference: str, at: datetime | None, version: str | None, force: bool) -> None:
    """Record that a patched release is out (starts the disclosure clock where the policy has one)."""
    _change_ticket(obj, reference, lambda session, settings, ticket, now: milestones.record(
        session, settings, ticket, Milestone.RELEASED, at=at or now, now=now, actor=_actor(settings), force=force, version=version))


# -- triage --------------------------------------------------------------------------------------


@main.command()
@click.argument("reference")
@click.argument("who")
@click.pass_obj
def assign(obj: Context, reference: str, who: str) -> None:
    """Assign the ticket to a maintainer (email, name or login from [[maintainers]])."""
    _change_ticket(obj, reference, lambda session, settings, ticket, now: (
        [], [f"assigned to {triage.assign(session, settings, ticket, who, now=now, actor=_actor(settings))}"]))


@main.command()
@click.argument("reference")
@click.argument("severity", type=click.Choice(SEVERITIES))
@click.option("--cvss", "cvss_vector", default=None, help="CVSS v3.1 or v4.0 vector; validated and scored.")
@click.pass_obj
def severity(obj: Context, reference: str, severity: str, cvss_vector: str | None) -> None:
    """Set the ticket's severity (and CVSS vector); severity-dependent deadlines follow."""

    def change(session, settings, ticket, now):  # type: ignore[no-untyped-def]
        moved, warning = triage.set_severity(session, settings, ticket, severity, now=now, actor=_actor(settings),
                                             cvss_vector=cvss_vector)
        notes = [f"CVSS {ticket.cvss_score} {ticket.cvss_vector}"] if cvss_vector else []
        return moved, notes + ([f"warning: {warning}"] if warning else [])

    _change_ticket(obj, reference, change)


@main.command()
@click.argument("reference")
@click.argument("labels", nargs=-1)
@click.option("--remove", multiple=True, help="A label to take off (repeatable).")
@click.pass_obj
def label(obj: Context, reference: str, labels: tuple[str, ...], remove: tuple[str, ...]) -> None:
    """Add labels to the ticket (and take some off with --remove)."""
    if not labels and not remove:
        raise click.UsageError("give labels to add, or --remove LABEL")
    _change_ticket(obj, reference, lambda session, settings, ticket, now: (
        [], ["labels " + (", ".join(triage.label(session, ticket, labels, remove, now=now, actor=_actor(settings)))
                          or "(none)")]))


@main.command()
@click.argument("reference")
@click.argument("into_reference")
@click.pass_obj
def merge(obj: Context, reference: str, into_reference: str) -> None:
    """Merge duplicate REFERENCE into INTO_REFERENCE; the duplicate's reporter is told."""

    def change(session, settings, ticket, now):  # type: ignore[no-untyped-def]
        into = tickets.find(session, into_reference)
        triage.merge(session, settings, ticket, into, now=now, actor=_actor(settings))
        return [], [f"merged into {into.reference}; its reporter was told"]

    _change_ticket(obj, reference, change)


@main.command()
@click.argument("reference")
@click.option("--reason", required=True, type=click.Choice(CLOSE_REASONS), help="Why it is closed.")
@click.option("--force", is_flag=True, help="Close as fixed without a recorded release.")
@click.pass_obj
def close(obj: Context, reference: str, reason: str, force: bool) -> None:
    """Close the ticket (it counts as resolved)."""
    _change_ticket(obj, reference, lambda session, settings, ticket, now: triage.close(
        session, settings, ticket, reason, now=now, actor=_actor(settings), force=force))


# -- correspondence ------------------------------------------------------------------------------


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


@main.command()
@click.argument("reference")
@_MESSAGE
@_FILE
@click.option("--cc", multiple=True, help="Also send to this address (a co-ordinator; repeatable).")
@click.pass_obj
def reply(obj: Context, reference: str, message: str | None, file: Path | None, cc: tuple[str, ...]) -> None:
    """Reply to the reporter from the intake address (counts as the human acknowledgement)."""
    text = _message_text(message, file, reference, "reply")

    def change(session, settings, ticket, now):  # type: ignore[no-untyped-def]
        sent = correspondence.reply(session, settings, ticket, text, now=now, actor=_actor(settings), cc=cc)
        return [], [f"reply queued to {', '.join(sent.recipients)} ({sent.message_id})"]

    _change_ticket(obj, reference, change)


@main.command()
@click.argument("reference")
@_MESSAGE
@_FILE
@click.pass_obj
def note(obj: Context, reference: str, message: str | None, file: Path | None) -> None:
    """Add an internal note to the ticket; it is never sent."""
    text = _message_text(message, file, reference, "note")

    def change(session, settings, ticket, now):  # type: ignore[no-untyped-def]
        correspondence.note(session, ticket, text, now=now, actor=_actor(settings))
        return [], ["note added (internal, not sent)"]

    _change_ticket(obj, reference, change)


# -- reminders, escalations and digests ---------------------------------------------------------


_NOW = click.option("--now", type=INSTANT, default=None,
                    help="Act as of this instant (ISO 8601 with offset; default: the current time).")


@main.command()
@_NOW
@click.option("--dry-run", is_flag=True, help="List what would be sent; send and record nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def sweep(obj: Context, now: datetime | None, dry_run: bool, as_json: bool) -> None:
    """Run one SLA sweep: reminders, breach notices and escalations due at --now, each sent once."""
    result = reminders.sweep(obj.engine(), obj.settings, now or datetime.now(timezone.utc), dry_run=dry_run)
    if as_json:
        _emit_json(result.as_dict())
        return
    verb = "would send" if dry_run else "queued"
    echo(f"sweep at {result.now.isoformat()}: {verb} {len(result.mails)} mail(s); "
               f"{result.examined} stage(s) looked at, {result.held} reminder(s) held for working hours")
    for mail in result.mails:
        echo(f"  {mail.reference} {mail.kind} to {', '.join(mail.recipients)}")
        for notice in mail.notices:
            echo(f"    {notice.stage} {notice.label} (at {notice.at.isoformat()})  {notice.key}")


@main.command("digest")
@click.argument("name")
@_NOW
@click.option("--preview", is_flag=True, help="Print the digest; send and record nothing.")
@click.option("--send", is_flag=True, help="Send it for its period, unless sent already (or empty).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
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
        _fail(str(exc))
        return
    if as_json:
        _emit_json({"status": status, **built.as_dict()})
    elif preview:
        echo(digest.text(settings, built), nl=False)
    else:
        echo({DigestStatus.SENT: f"digest {name} for {built.period.isoformat()} queued ({built.key})",
                    DigestStatus.ALREADY_SENT: f"digest {name} for {built.period.isoformat()} was sent already ({built.key})",
                    DigestStatus.EMPTY: f"digest {name} for {built.period.isoformat()} is empty: not sent (send_empty = false)",
                    DigestStatus.NO_RECIPIENTS: f"digest {name}: no recipients and no [[maintainers]]: not sent"}[status])
    if status == DigestStatus.NO_RECIPIENTS:
        sys.exit(1)


@main.command("reminders")
@click.argument("reference")
@_NOW
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def reminders_command(obj: Context, reference: str, now: datetime | None, as_json: bool) -> None:
    """What was sent for ticket REFERENCE and what each of its stages gets next."""
    try:
        found = reminders.ticket_reminders(obj.engine(), obj.settings, reference, now or datetime.now(timezone.utc))
    except tickets.TicketNotFound:
        _fail(f"no ticket {reference}")
        return
    data = found.as_dict()
    if as_json:
        _emit_json(data)
        return
    echo(f"{found.reference}: sent")
    for sent in data["sent"] or [{"kind": "nothing yet"}]:
        echo("  " + " ".join(filter(None, [sent["kind"], sent.get("stage"), sent.get("point"),
                                                 sent.get("queued_at") and f"queued {sent['queued_at']}",
                                                 sent.get("to") and "to " + ", ".join(sent["to"])])))
    echo("due now (the next sweep sends it)" if data["due_now"] else "due now: nothing")
    for item in data["due_now"]:
        echo(f"  {item['stage']} {item['kind']} {item['point']} (at {item['at']})")
    echo("next")
    for item in data["next"] or [{"stage": "nothing scheduled", "kind": "", "point": "", "at": ""}]:
        echo(f"  {item['stage']} {item['kind']} {item['point']} {item['at'] and 'at ' + item['at']}".rstrip())


# -- the database: schema migrations, backup, restore ----------------------------------------


@main.group("db")
def db_group() -> None:
    """The database schema: upgrade (migrate), check against the models, current, history."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_obj
def db_upgrade(obj: Context, revision: str) -> None:
    """Migrate the database to REVISION (default: the newest). Safe to run any number of times,
    and while intake runs: migrations take the write lock."""
    try:
        upgraded = schema.upgrade(obj.engine(at_head=False), revision)
    except schema.SchemaRefused as exc:
        _fail(str(exc))
        return
    if upgraded.stamped:
        echo(f"adopted a database from before migrations as revision {upgraded.before}")
    if upgraded.before == upgraded.after:
        echo(f"database already at {upgraded.after}")
    else:
        echo(f"database upgraded from {upgraded.before or 'empty'} to {upgraded.after}")
    if upgraded.after == schema.head():
        filled = deadlines.backfill(obj.engine(), obj.settings, datetime.now(timezone.utc))
        if filled.tickets:
            echo(f"deadlines computed for {filled.tickets} ticket(s) opened before they were stored")
        for reference, error in filled.errors.items():
            echo(f"  {reference}: no deadlines: {error}", err=True)


@db_group.command("check")
@click.pass_obj
def db_check(obj: Context) -> None:
    """Exit 1 listing the differences when the database at head differs from the models (a model
    changed without a migration, or the database was changed by hand)."""
    engine = obj.engine()
    found = schema.differences(engine)
    if found:
        echo(f"the database (at {schema.current(engine)}) and the models differ:", err=True)
        for line in found:
            echo(f"  {line}", err=True)
        _fail("a model change needs a migration (`intake db revision MESSAGE`), or the database was altered")
    echo(f"database at {schema.head()} matches the models")


@db_group.command("current")
@click.pass_obj
def db_current(obj: Context) -> None:
    """The database's schema revision, and the newest this intake has."""
    at = schema.current(obj.engine(at_head=False))
    newest = schema.head()
    echo(f"{at or 'none'} (newest: {newest}{'' if at == newest else '; run `intake db upgrade`'})")


@db_group.command("history")
def db_history() -> None:
    """The migrations, oldest first."""
    for script in reversed(list(schema.scripts().walk_revisions())):
        echo(f"{script.revision}  {script.doc}")


@db_group.command("revision")
@click.argument("message")
def db_revision(message: str) -> None:
    """For developers: write the migration the models need into a source checkout."""
    echo(f"wrote {schema.new_revision(message)}: read it, test it, commit it")


@main.group("secret")
def secret_group() -> None:
    """The secret that signs maintainers' reply addresses."""


@secret_group.command("rotate")
@click.pass_obj
def secret_rotate(obj: Context) -> None:
    """Make a new reply-address signing secret: every reply address given out before stops working."""
    try:
        still_open = reply_tokens.rotate(obj.engine(), datetime.now(timezone.utc))
    except reply_tokens.SecretGiven as exc:
        _fail(f"the reply secret comes from {exc}, not the database: replace it there with a new random "
              "value (e.g. `head -c 32 /dev/urandom | base64`) and restart intake on every node")
        return
    echo("reply secret rotated: every reply address given out before stops working now (on other "
         f"nodes within {reply_tokens.CACHE_SECONDS:.0f} seconds)")
    echo(f"{still_open} open ticket(s): their maintainers get fresh reply addresses with their next notice")


@main.command("backup")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@click.option("--pg-dump", "pg_dump", is_flag=True, help="PostgreSQL: run pg_dump (custom format) into PATH.")
@click.pass_obj
def backup_command(obj: Context, path: Path, force: bool, pg_dump: bool) -> None:
    """Back up the database to PATH, consistently, while intake runs.

    SQLite: an online backup, checked and renamed into place. PostgreSQL: use pg_dump
    (printed, or run with --pg-dump). Any schema revision: back up before `intake db upgrade`."""
    engine = obj.engine(at_head=False)
    try:
        if is_sqlite(engine):
            copied = backups.backup_sqlite(engine, path, force)
        elif pg_dump:
            copied = backups.run_pg_dump(engine, path, force)
        else:
            command, _ = backups.pg_dump_command(engine, path)
            _fail("intake backs up SQLite itself; a PostgreSQL database is backed up with pg_dump:\n  "
                  + " ".join(command) + "\n(password from PGPASSWORD or ~/.pgpass; or run `intake backup --pg-dump "
                  f"{path}`; restore with pg_restore)")
            return
    except backups.BackupError as exc:
        _fail(str(exc))
        return
    _report_copy("backed up to", copied)


@main.command("restore")
@click.argument("backup", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Restore even while the database is in use.")
@click.pass_obj
def restore_command(obj: Context, backup: Path, force: bool) -> None:
    """Replace the SQLite database's contents with BACKUP (made by `intake backup`).

    Stop intake first: a database in use is refused unless --force. The backup is checked with
    PRAGMA integrity_check before, the database after. Then `intake db upgrade` (or `intake
    serve`) brings an older backup's schema up to date."""
    engine = obj.engine(at_head=False)
    if not is_sqlite(engine):
        _fail("intake restores SQLite only; restore a PostgreSQL dump with pg_restore")
    try:
        copied = backups.restore_sqlite(engine, backup, force)
    except backups.BackupError as exc:
        _fail(str(exc))
        return
    _report_copy("restored", copied)


def _report_copy(verb: str, copied: backups.Copied) -> None:
    contents = "" if copied.tickets is None else (
        f": {copied.tickets} ticket(s), {copied.messages} stored message(s), schema {copied.revision or 'none'}")
    echo(f"{verb} {copied.path} ({copied.bytes} bytes){contents}")


# Credit, advisories, metrics and security.txt (issue 6): their commands register on `main` there.
from intake.cli import reports as cli_reports  # noqa: E402,F401
