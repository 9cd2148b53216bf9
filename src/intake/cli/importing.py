"""``intake import PATH``: an existing mailbox (mbox file or Maildir folder) imported as history
(the work is :mod:`intake.run.mailbox_import`'s)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from intake.cli.common import JSON_OPTION, Context, emit_json, fail
from intake.display import echo
from intake.run import mailbox_import


@click.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--acknowledge", is_flag=True,
              help="Acknowledge (and tell the maintainers about) the messages younger than --younger-than.")
@click.option("--younger-than", default=None, metavar="DURATION",
              help="With --acknowledge: how young a message must be to be answered, e.g. 7d, 12h.")
@JSON_OPTION
@click.pass_obj
def import_command(obj: Context, path: Path, acknowledge: bool, younger_than: str | None, as_json: bool) -> None:
    """Import an mbox file or Maildir folder as history: stored, processed, nothing sent.

    Each message is stored and processed as if received at its Date:, oldest first, so threads are
    rebuilt; no acknowledgement and no notice go out unless --acknowledge (for messages younger
    than --younger-than). Running it again imports nothing new (duplicates by Message-ID or bytes)."""
    if acknowledge != (younger_than is not None):
        raise click.UsageError("--acknowledge and --younger-than go together")
    try:
        age = mailbox_import.parse_age(younger_than) if younger_than is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--younger-than") from None
    try:
        size = mailbox_import.box_size(path)
    except (mailbox_import.NotAMailbox, OSError) as exc:
        fail(str(exc), code=2)
    engine = obj.engine()
    now = datetime.now(timezone.utc)
    if sys.stdout.isatty() and not as_json:
        with click.progressbar(length=size, label=f"importing {size} messages") as bar:
            result = mailbox_import.import_mailbox(engine, obj.settings, path, now, age, bar.update)
    else:
        result = mailbox_import.import_mailbox(engine, obj.settings, path, now, age)
    if as_json:
        emit_json({**result.as_dict(), "close_hint": CLOSE_IMPORTED_HINT if result.open_tickets else None})
        return
    echo(f"imported {result.imported}, duplicates {result.duplicates}, held {result.held}, failed {result.failed} "
         f"({result.tickets} tickets opened, {size / max(result.seconds, 1e-9):.0f} messages/s)")
    if result.acknowledged_by_replies:
        echo(f"{result.acknowledged_by_replies} ticket(s) acknowledged at the date of our own reply found in the box")
    if result.open_tickets:
        echo(f"{result.open_tickets} imported ticket(s) open, {result.stages_past_due} stage(s) already past due: "
             "shown as missed by show, stats and the digest, but never mailed about (reminders and breach "
             "notices start from the import)")
        echo(f"to close old ones there is no bulk close; e.g. {CLOSE_IMPORTED_HINT}")


# Closing is one ticket at a time; `intake tickets --json` says which tickets were imported.
CLOSE_IMPORTED_HINT = ("intake tickets --json | jq -r '.[] | select(.imported_at) | .reference' "
                       "| xargs -I{} intake close {} --reason REASON")
