"""``intake purge``: erase what [retention] says is past its time (through
:func:`intake.tickets.retention.purge`, as the scheduler does daily)."""

from __future__ import annotations

from datetime import datetime, timezone

import click

from intake.cli.common import JSON_OPTION, NOW_OPTION, Context, emit_json
from intake.display import echo
from intake.store.reclaim import Reclaimed
from intake.tickets import retention


@click.command("purge")
@click.option("--dry-run", is_flag=True, help="Say what would be purged, and what a legal hold keeps; change nothing.")
@click.option("--rewrite", is_flag=True,
              help="Rebuild the storage too: SQLite VACUUM, PostgreSQL VACUUM FULL. Intake's writes wait while it "
                   "runs (mail gets 451 past busy_timeout): once after upgrading, or after a large purge.")
@NOW_OPTION
@JSON_OPTION
@click.pass_obj
def purge(obj: Context, dry_run: bool, rewrite: bool, now: datetime | None, as_json: bool) -> None:
    """Erase content past its [retention] period: closed tickets' reports, threads and mail; held
    messages; bodies of sent mail.

    A ticket keeps its reference, dates, states, severity, deadlines, credit and events, and gets a
    content-purged event; open tickets and those labelled with legal_hold_label are never purged.
    Then the database's files are cleared (SQLite: WAL checkpointed and truncated; PostgreSQL:
    VACUUM). Exit 1 if that could not be finished."""
    now = now or datetime.now(timezone.utc)
    report = retention.purge(obj.engine(), obj.settings, now, dry_run=dry_run, rewrite=rewrite)
    if as_json:
        emit_json(report.as_dict())
    else:
        _print(report, obj.settings.retention.legal_hold_label)
    if report.reclaimed and report.reclaimed.incomplete:
        raise SystemExit(1)


def _print(report: retention.PurgeReport, legal_hold_label: str) -> None:
    verb = "would purge" if report.dry_run else "purged"
    tickets = report.tickets
    if tickets is None:
        echo("closed tickets: kept forever ([retention] after_close)")
    else:
        named = f": {', '.join(tickets.purged)}" if tickets.purged else ""
        echo(f"closed tickets unchanged since {tickets.cutoff:%Y-%m-%d %H:%M} UTC: {verb} "
             f"{len(tickets.purged)}{named}")
        if tickets.legal_hold:
            echo(f"  kept by legal hold (label {legal_hold_label}): {', '.join(tickets.legal_hold)}")
    if report.held is None:
        echo("held messages: kept forever ([retention] held)")
    else:
        echo(f"held messages from before {report.held.cutoff:%Y-%m-%d %H:%M} UTC: {verb} {report.held.total}"
             + _counts(report.held.by_decision))
    if report.sent_mail is None:
        echo("sent mail: kept forever ([retention] sent_mail)")
    else:
        echo(f"bodies of mail sent before {report.sent_mail.cutoff:%Y-%m-%d %H:%M} UTC: {verb} "
             f"{sum(report.sent_mail.by_kind.values())}" + _counts(report.sent_mail.by_kind))
    if (report.held and not report.held.complete) or (report.sent_mail and not report.sent_mail.complete):
        echo("intake: stopped after the most batches one run takes; run it again", err=True)
    if report.reclaimed:
        print_reclaimed(report.reclaimed)


def _counts(counts: dict[str, int]) -> str:
    return f" ({', '.join(f'{label} {count}' for label, count in counts.items())})" if counts else ""


def print_reclaimed(reclaimed: Reclaimed) -> None:
    """What clearing the database's files ran, what it could not do, and what stays regardless."""
    echo(f"storage: {'; '.join(reclaimed.ran) or 'nothing ran'}")
    for note in reclaimed.notes:
        echo(f"  note: {note}")
    for problem in reclaimed.incomplete:
        echo(f"intake: {problem}", err=True)
