"""CLI commands for what goes out of intake: credit, advisories, metrics and security.txt.

The work is done by :mod:`intake.tickets.credit`, :mod:`intake.tickets.advisory`,
:mod:`intake.sla.stats` and :mod:`intake.config.security_txt`.
"""

from __future__ import annotations

import re  # CLI arguments only; senders' text goes through intake.patterns (RE2)
from datetime import datetime, timedelta, timezone

import click

from intake import display
from intake.cli.common import JSON_OPTION, Context, actor, emit_json, fail, record_read, write_file_or_fail
from intake.config import security_txt
from intake.config.settings import EXIT_CONFIG
from intake.display import echo
from intake.sla import stats
from intake.store.db import write_session
from intake.tickets import advisory, credit, reads
from intake.understand import credit_words
from intake.vocabulary import AuditAction

_RELATIVE = re.compile(r"(\d+)([hdw])")
_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_since(value: str, now: datetime) -> datetime:
    """``90d`` / ``12w`` / ``36h`` before *now*, a date (``2026-01-31``, midnight UTC), or an ISO 8601
    instant with an offset."""
    relative = _RELATIVE.fullmatch(value.strip())
    if relative:
        return now - int(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use e.g. 90d, 12w, 2026-01-31 or 2026-01-31T09:00:00+10:00",
                                 param_hint="--since") from None
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
        return instant.replace(tzinfo=timezone.utc)
    if instant.utcoffset() is None:
        raise click.BadParameter(f"{value!r} has no UTC offset: add one, e.g. {value}Z", param_hint="--since")
    return instant


# -- credit -------------------------------------------------------------------------------------


@click.command("credit")
@click.argument("reference")
@click.option("--name", default=None, help="Name to credit the reporter as.")
@click.option("--handle", default=None, help="Their handle, e.g. @janed.")
@click.option("--url", default=None, help="Their web page (http or https).")
@click.option("--anonymous", is_flag=True, help="The reporter wants no credit.")
@click.option("--clear", is_flag=True, help="Forget the recorded preference.")
@JSON_OPTION
@click.pass_obj
def credit_command(obj: Context, reference: str, name: str | None, handle: str | None, url: str | None,
                   anonymous: bool, clear: bool, as_json: bool) -> None:
    """Show or set how the reporter of REFERENCE is credited.

    Without options: the recorded preference. --name/--handle/--url, --anonymous or --clear
    replace it (an event records who changed it)."""
    setting = bool(name or handle or url)
    if sum((setting, anonymous, clear)) > 1:
        raise click.UsageError("give --name/--handle/--url, --anonymous or --clear (one of them)")
    wanted = None  # with --clear: forget it
    if setting or anonymous:
        try:
            wanted = credit_words.make(name=name, handle=handle, url=url, anonymous=anonymous)
        except credit_words.CreditError as exc:
            raise click.UsageError(str(exc)) from None
    try:
        with write_session(obj.engine()) as session:
            ticket = reads.find(session, reference)
            if setting or anonymous or clear:
                credit.set_credit(session, ticket, wanted, datetime.now(timezone.utc), actor=actor(obj.settings))
            shown, ref = credit.credit_of(ticket), ticket.reference
    except reads.TicketNotFound:
        fail(f"no ticket {reference}")
    if as_json:
        emit_json({"reference": ref, "credit": shown.as_dict() if shown else None})
    elif shown is None:
        echo(f"{ref}: no credit preference recorded")
    else:
        echo(f"{ref}: credited as {shown.display}{' ' + shown.url if shown.url else ''} (from {shown.source})")


@click.command("credits")
@click.option("--since", "since_text", default=None,
              help="Tickets released, disclosed or resolved since: 2026-01-31, an ISO instant, or 90d.")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True)
@click.pass_obj
def credits_command(obj: Context, since_text: str | None, fmt: str) -> None:
    """Whom to thank in release notes: the credited reporters of tickets that went out.

    A ticket counts from its first released, disclosed or resolved milestone (when it happened).
    Anonymous reporters appear as "anonymous reporter"; tickets with no recorded preference are
    named on stderr (and under "without_preference" in JSON)."""
    since = parse_since(since_text, datetime.now(timezone.utc)) if since_text else None
    engine = obj.engine()
    lines = credit.went_out(engine, since)
    # Reporters' names and handles: one entry naming every ticket exported.
    record_read(obj, engine, AuditAction.CREDITS, tickets=[line.reference for line in lines], since=since_text)
    output = credit.render(lines, fmt, since)
    if output:
        (display.echo_json if fmt == "json" else echo)(output)
    missing = [line.reference for line in lines if line.credit is None]
    if missing and fmt != "json":
        echo(f"intake: no credit preference recorded for {', '.join(missing)} "
                   "(ask the reporter; `intake credit REF --name …` or `--anonymous`)", err=True)


# -- advisory -----------------------------------------------------------------------------------


@click.command("advisory")
@click.argument("reference")
@click.option("--format", "fmt", type=click.Choice(["osv"]), default="osv", show_default=True)
@click.option("-o", "--output", "output", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write (default: standard output).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.pass_obj
def advisory_command(obj: Context, reference: str, fmt: str, output: str, force: bool) -> None:
    """Write an OSV advisory draft for REFERENCE; replace every "TODO" before publishing."""
    try:
        engine = obj.engine()
        detail = reads.ticket_detail(engine, reference)
    except reads.TicketNotFound:
        fail(f"no ticket {reference}")
    record_read(obj, engine, AuditAction.ADVISORY, ticket_id=detail.ticket.id)
    settings = obj.settings
    draft = advisory.osv(detail, settings.advisory.id_prefix, settings.intake.from_name, datetime.now(timezone.utc))
    text = display.dumps(draft, indent=2) + "\n"
    if detail.ticket.credit is None:
        echo(f"intake: {detail.ticket.reference} has no credit preference: the draft credits nobody", err=True)
    if output == "-":
        display.echo_json(text, nl=False)
        return
    write_file_or_fail(output, text.encode("utf-8"), force)  # an unpublished advisory: 0600, like the reports
    echo(f"wrote {output}", err=True)


# -- metrics ------------------------------------------------------------------------------------


@click.command("stats")
@click.option("--since", "since_text", default="90d", show_default=True,
              help="Tickets received since: 90d, 12w, 2026-01-31 or an ISO instant.")
@JSON_OPTION
@click.pass_obj
def stats_command(obj: Context, since_text: str, as_json: bool) -> None:
    """Per stage: median and 90th-percentile time to meet it, share met on time, open breaches;
    tickets by state and severity, messages by decision, held mail and purged."""
    now = datetime.now(timezone.utc)
    figures = stats.compute(obj.engine(), parse_since(since_text, now), now)
    if as_json:
        emit_json(figures.as_dict())
    else:
        echo(figures.render_text())


# -- security.txt -------------------------------------------------------------------------------


@click.command("security-txt")
@click.pass_obj
def security_txt_command(obj: Context) -> None:
    """Print /.well-known/security.txt (RFC 9116, LF line endings) from the configuration."""
    settings = obj.settings
    try:
        text = security_txt.render(settings)
    except security_txt.NotConfigured as exc:
        fail(str(exc), EXIT_CONFIG)
    warning = security_txt.expiry_warning(settings, datetime.now(timezone.utc))
    if warning:
        echo(f"intake: warning: {warning}", err=True)
    echo(text, nl=False)
