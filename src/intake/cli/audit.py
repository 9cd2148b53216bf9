"""``intake audit verify|log|anchor|rekey``: the tamper-evident audit chain of events and reads (through
:mod:`intake.store.audit_verify`).

Every one of them first starts the chain on a database that has none yet (one from before it):
the events stored until then are sealed as of that moment, and it says so.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import click
from sqlalchemy import Engine

from intake.cli.common import JSON_OPTION, Context, actor, emit_json, fail, iso, table
from intake.cli.reports import parse_since
from intake.display import echo
from intake.store import audit_verify

_SHOWN_PROBLEMS = 20  # the first ones; the rest are counted


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit chain of events and maintainers' reads: verify, log, anchor, rekey."""


def _started(obj: Context) -> Engine:
    """The database, its chain started (history before it sealed as of now) if it was not."""
    engine = obj.engine()
    now = datetime.now(timezone.utc)
    sealed = audit_verify.start(engine, now)
    if sealed:
        echo(f"intake: started the audit chain: sealed the {sealed} event(s) stored before it as of "
             f"{now.isoformat()}; they are vouched for from this moment, not from when they happened", err=True)
    return engine


@audit_group.command("verify")
@click.option("--anchor", "anchor_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A file written by `intake audit anchor`: the chain must still hold that entry unchanged.")
@JSON_OPTION
@click.pass_obj
def verify(obj: Context, anchor_file: Path | None, as_json: bool) -> None:
    """Exit 0 when the chain and the events are intact, 1 naming the first bad entry (an event or
    entry edited, deleted, inserted or reordered; with --anchor, entries cut off after it)."""
    anchor = _read_anchor(anchor_file) if anchor_file else None
    result = audit_verify.verify(_started(obj), anchor)
    if as_json:
        emit_json({"intact": result.intact, "entries": result.entries, "events": result.events,
                   "problems": [{"seq": p.seq, "event_id": p.event_id, "problem": p.text} for p in result.problems]})
    elif result.intact:
        echo(f"audit chain intact: {result.entries} entries, {result.events} events"
             + (f", anchored entry {anchor.seq} in place" if anchor else ""))
    else:
        echo(f"intake: audit chain broken: first bad: {result.problems[0].text}", err=True)
        for problem in result.problems[1:_SHOWN_PROBLEMS]:
            echo(f"  also: {problem.text}", err=True)
        if len(result.problems) > _SHOWN_PROBLEMS:
            echo(f"  and {len(result.problems) - _SHOWN_PROBLEMS} more (--json lists all)", err=True)
    if not result.intact:
        raise SystemExit(1)


def _read_anchor(path: Path) -> audit_verify.Anchor:
    try:
        return audit_verify.Anchor.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", 2)
    except ValueError as exc:
        fail(f"{path}: {exc}", 2)


@audit_group.command("log")
@click.argument("reference", required=False)
@click.option("--since", "since_text", default=None, help="Entries since: 90d, 12w, 2026-01-31 or an ISO instant.")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True, help="At most this many.")
@JSON_OPTION
@click.pass_obj
def log(obj: Context, reference: str | None, since_text: str | None, limit: int, as_json: bool) -> None:
    """Who did what when, newest first: events and reads of report content, of ticket REFERENCE
    if given."""
    since = parse_since(since_text, datetime.now(timezone.utc)) if since_text else None
    lines = audit_verify.log(_started(obj), reference, since, limit)
    if as_json:
        emit_json([{"seq": line.seq, "at": iso(line.at), "actor": line.actor, "action": line.action,
                    "reference": line.reference, "detail": line.detail} for line in lines])
        return
    if not lines:
        echo("no audit entries")
        return
    table([[str(line.seq), iso(line.at) or "", line.actor, line.action, line.reference or "-",
            " ".join(f"{k}={v}" for k, v in line.detail.items())] for line in lines],
          ["SEQ", "AT (UTC)", "ACTOR", "ACTION", "TICKET", "DETAIL"])


@audit_group.command("rekey")
@click.pass_obj
def rekey(obj: Context) -> None:
    """Move a chain MAC'd with the key intake kept in the database (no key was configured when it
    started) to the key now configured ([audit] key_file or the audit-key credential): verified
    first, every entry re-MAC'd, the old key deleted. Stop `intake serve` first, and start it with
    the new key after."""
    engine = _started(obj)
    try:
        moved = audit_verify.rekey(engine, actor(obj.settings), datetime.now(timezone.utc))
    except audit_verify.RekeyRefused as exc:
        fail(str(exc))
    echo(f"audit chain moved to the configured key: {moved} entries re-MAC'd")


@audit_group.command("anchor")
@click.pass_obj
def anchor(obj: Context) -> None:
    """Print the chain's head as JSON (seq, mac, at): keep it elsewhere, and check it later with
    `intake audit verify --anchor FILE`."""
    head = audit_verify.head(_started(obj))
    if head is None:
        fail("the audit chain is empty: nothing to anchor yet")
    emit_json(head.as_dict())
