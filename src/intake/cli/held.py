"""CLI command for held mail: ``intake messages purge`` deletes old held messages, keeping a count.

The work is done by :func:`intake.tickets.held.purge_held`.
"""

from __future__ import annotations

from datetime import datetime, timezone

import click

from intake.cli.common import JSON_OPTION, NOW_OPTION, Context, emit_json
from intake.cli.reports import parse_since
from intake.display import echo
from intake.tickets import held

_DEFAULT_AGE = f"{held.HELD_RETENTION.days}d"


@click.command("purge")
@click.option("--older-than", "older_than_text", default=_DEFAULT_AGE, show_default=True,
              help="Purge held messages older than this: 90d, 12w, 36h, or a date / ISO instant.")
@click.option("--dry-run", is_flag=True, help="Count what would be purged; delete nothing.")
@NOW_OPTION
@JSON_OPTION
@click.pass_obj
def purge(obj: Context, older_than_text: str, dry_run: bool, now: datetime | None, as_json: bool) -> None:
    """Delete held messages older than --older-than (90d), keeping a count.

    Held: spam, auto-replies, bounces, loops, refused replies, duplicates, failed. Those received and
    processed before the cutoff go, except any on a ticket; each run's count per decision is kept
    (`intake stats`). The database file does not shrink by itself (SQLite reuses the freed pages)."""
    now = now or datetime.now(timezone.utc)
    try:
        cutoff = parse_since(older_than_text, now)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="--older-than") from None
    result = held.purge_held(obj.engine(), now, older_than=now - cutoff, dry_run=dry_run)
    if as_json:
        emit_json(result.as_dict())
        return
    verb = "would purge" if dry_run else "purged"
    shown = ", ".join(f"{label} {count}" for label, count in sorted(result.by_decision.items()))
    echo(f"{verb} {result.total} held message(s) from before {result.cutoff:%Y-%m-%d %H:%M} UTC"
         + (f": {shown}" if shown else ""))
    if not result.complete:
        echo("intake: stopped after the most batches one run takes; run it again", err=True)
