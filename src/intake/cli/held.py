"""``intake messages purge``: held messages only, older than ``[retention] held`` or --older-than
(``intake purge`` does every kind). The work is :func:`intake.tickets.retention.purge_held_only`.
"""

from __future__ import annotations

from datetime import datetime, timezone

import click

from intake.cli.common import JSON_OPTION, NOW_OPTION, Context, emit_json
from intake.cli.reports import parse_since
from intake.cli.retention import print_reclaimed
from intake.display import echo
from intake.tickets import retention


@click.command("purge")
@click.option("--older-than", "older_than_text", default=None,
              help="Purge held messages older than this: 90d, 12w, 36h, or a date / ISO instant "
                   "(default: [retention] held).")
@click.option("--dry-run", is_flag=True, help="Count what would be purged; delete nothing.")
@NOW_OPTION
@JSON_OPTION
@click.pass_obj
def purge(obj: Context, older_than_text: str | None, dry_run: bool, now: datetime | None, as_json: bool) -> None:
    """Delete held messages older than --older-than ([retention] held), keeping a count.

    Held: spam, auto-replies, bounces, loops, refused replies, duplicates, failed. Those received and
    processed before the cutoff go, except any on a ticket; each run's count per decision is kept
    (`intake stats`). `intake purge` does this with the other retention periods."""
    now = now or datetime.now(timezone.utc)
    if older_than_text is None:
        older_than = obj.settings.retention.period("held")
        if older_than is None:
            echo("held messages are kept forever ([retention] held); --older-than purges them anyway")
            return
    else:
        try:
            older_than = now - parse_since(older_than_text, now)
        except click.BadParameter as exc:
            raise click.BadParameter(exc.message, param_hint="--older-than") from None
    result, reclaimed = retention.purge_held_only(obj.engine(), now, older_than, dry_run=dry_run)
    if as_json:
        emit_json(result.as_dict())
    else:
        verb = "would purge" if dry_run else "purged"
        shown = ", ".join(f"{label} {count}" for label, count in sorted(result.by_decision.items()))
        echo(f"{verb} {result.total} held message(s) from before {result.cutoff:%Y-%m-%d %H:%M} UTC"
             + (f": {shown}" if shown else ""))
        if reclaimed:
            print_reclaimed(reclaimed)
    if not result.complete:
        echo("intake: stopped after the most batches one run takes; run it again", err=True)
    if reclaimed and reclaimed.incomplete:
        raise SystemExit(1)
