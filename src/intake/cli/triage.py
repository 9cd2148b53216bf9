"""Commands that move a ticket on: assign, language, severity, label, merge, close, reopen; the milestones
(ack, assess, released, resolve, disclose: see :func:`__getattr__`); wait and resume (on the reporter). Each is one call to
:mod:`intake.tickets.triage`, :mod:`intake.tickets.milestones` or :mod:`intake.tickets.updates` (those
that send the reporter a progress update: assess, released, disclose, disclose-date, close; ``--quiet`` and
``--message``) in :func:`change_ticket`'s transaction."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import click

from intake.cli.common import AT_OPTION, FORCE_OPTION, Context, actor, change_ticket
from intake.tickets import disclosure, milestones, reads, triage, updates
from intake.vocabulary import CLOSE_REASONS, MILESTONE_SPEC, MILESTONE_SPECS, SEVERITIES, Milestone


def _update_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--quiet`` and ``--message`` of a command that sends the reporter a progress update."""
    command = click.option("--message", default=None,
                           help="A personal line added to the update the reporter gets.")(command)
    return click.option("--quiet", is_flag=True, help="Send the reporter no update for this change.")(command)


def _milestone_command(milestone: str) -> click.Command:
    """``intake <verb> REFERENCE``: record *milestone*, as its entry in MILESTONE_SPECS says."""
    @click.command(MILESTONE_SPEC[milestone].verb, help=MILESTONE_SPEC[milestone].summary)
    @click.argument("reference")
    @AT_OPTION
    @FORCE_OPTION
    @click.pass_obj
    def command(obj: Context, reference: str, at: datetime | None, force: bool) -> None:
        change_ticket(obj, reference, lambda session, settings, ticket, now: milestones.record(
            session, settings, ticket, milestone, at=at or now, now=now, actor=actor(settings), force=force))

    return command


def _ticket_command(name: str, change: Callable[..., Any], help_text: str) -> click.Command:
    """A command that makes one change to ticket REFERENCE: *change(session, settings, ticket, now=, actor=)*."""
    @click.command(name, help=help_text)
    @click.argument("reference")
    @click.pass_obj
    def command(obj: Context, reference: str) -> None:
        change_ticket(obj, reference, lambda session, settings, ticket, now: change(
            session, settings, ticket, now=now, actor=actor(settings)))

    return command


wait = _ticket_command("wait", milestones.wait,
                       "The ticket waits on the reporter (clocks stop where the policy says so).")
resume = _ticket_command("resume", milestones.resume, "The ticket no longer waits on the reporter.")
reopen = _ticket_command("reopen", triage.reopen, "Reopen a closed or resolved ticket.")


@click.command(MILESTONE_SPEC[Milestone.ASSESSED].verb, help=MILESTONE_SPEC[Milestone.ASSESSED].summary)
@click.argument("reference")
@click.option("--severity", required=True, type=click.Choice(SEVERITIES), help="The assessed severity.")
@AT_OPTION
@FORCE_OPTION
@_update_options
@click.pass_obj
def assess(obj: Context, reference: str, severity: str, at: datetime | None, force: bool, quiet: bool,
           message: str | None) -> None:
    change_ticket(obj, reference, lambda session, settings, ticket, now: updates.assess(
        session, settings, ticket, severity, at=at or now, now=now, actor=actor(settings), force=force,
        choice=updates.UpdateChoice(quiet, message)))


@click.command(MILESTONE_SPEC[Milestone.RELEASED].verb, help=MILESTONE_SPEC[Milestone.RELEASED].summary)
@click.argument("reference")
@AT_OPTION
@click.option("--version", "version", default=None, help="The release that carries the fix.")
@FORCE_OPTION
@_update_options
@click.pass_obj
def released(obj: Context, reference: str, at: datetime | None, version: str | None, force: bool, quiet: bool,
             message: str | None) -> None:
    change_ticket(obj, reference, lambda session, settings, ticket, now: updates.released(
        session, settings, ticket, at=at or now, now=now, actor=actor(settings), force=force, version=version,
        choice=updates.UpdateChoice(quiet, message)))


@click.command("disclose-date")
@click.argument("reference")
@click.argument("when", metavar="DATE", type=click.DateTime(formats=["%Y-%m-%d"]))
@click.option("--force", is_flag=True, help="Agree a date later than the policy's limit.")
@_update_options
@click.pass_obj
def disclose_date(obj: Context, reference: str, when: datetime, force: bool, quiet: bool, message: str | None) -> None:
    """Agree the disclosure date (YYYY-MM-DD) of REFERENCE: accept the reporter's proposal or counter it.

    The reporter gets a "disclosure scheduled" update (once per date); both sides are reminded 7
    and 1 days before. A date in the past is refused, and one later than the policy's limit
    (README: "Coordinated disclosure") unless --force."""
    change_ticket(obj, reference, lambda session, settings, ticket, now: disclosure.agree(
        session, settings, ticket, when.date(), now=now, actor=actor(settings), force=force,
        choice=updates.UpdateChoice(quiet, message)))


@click.command(MILESTONE_SPEC[Milestone.DISCLOSED].verb, help=MILESTONE_SPEC[Milestone.DISCLOSED].summary)
@click.argument("reference")
@AT_OPTION
@click.option("--advisory", default=None, help="The advisory's id or URL (the reporter's update names it).")
@FORCE_OPTION
@_update_options
@click.pass_obj
def disclose(obj: Context, reference: str, at: datetime | None, advisory: str | None, force: bool, quiet: bool,
             message: str | None) -> None:
    change_ticket(obj, reference, lambda session, settings, ticket, now: updates.disclosed(
        session, settings, ticket, at=at or now, now=now, actor=actor(settings), force=force, advisory=advisory,
        choice=updates.UpdateChoice(quiet, message)))


@click.command()
@click.argument("reference")
@click.argument("who")
@click.pass_obj
def assign(obj: Context, reference: str, who: str) -> None:
    """Assign the ticket to a maintainer (email, name or login from [[maintainers]])."""
    change_ticket(obj, reference, lambda session, settings, ticket, now: (
        [], [f"assigned to {triage.assign(session, settings, ticket, who, now=now, actor=actor(settings))}"]))


@click.command()
@click.argument("reference")
@click.argument("tag")
@click.pass_obj
def language(obj: Context, reference: str, tag: str) -> None:
    """Write the ticket's later mail to its reporter in language TAG (one of [intake] languages).

    Updates, status replies and other automatic mail use it from now on; mail already sent stays as it was."""
    change_ticket(obj, reference, lambda session, settings, ticket, now: (
        [], [f"language {triage.set_language(session, settings, ticket, tag, now=now, actor=actor(settings))}"]))


@click.command()
@click.argument("reference")
@click.argument("severity", type=click.Choice(SEVERITIES))
@click.option("--cvss", "cvss_vector", default=None, help="CVSS v3.1 or v4.0 vector; validated and scored.")
@click.pass_obj
def severity(obj: Context, reference: str, severity: str, cvss_vector: str | None) -> None:
    """Set the ticket's severity (and CVSS vector); severity-dependent deadlines follow."""

    def change(session, settings, ticket, now):  # type: ignore[no-untyped-def]
        moved, warning = triage.set_severity(session, settings, ticket, severity, now=now, actor=actor(settings),
                                             cvss_vector=cvss_vector)
        notes = [f"CVSS {ticket.cvss_score} {ticket.cvss_vector}"] if cvss_vector else []
        return moved, notes + ([f"warning: {warning}"] if warning else [])

    change_ticket(obj, reference, change)


@click.command()
@click.argument("reference")
@click.argument("labels", nargs=-1)
@click.option("--remove", multiple=True, help="A label to take off (repeatable).")
@click.pass_obj
def label(obj: Context, reference: str, labels: tuple[str, ...], remove: tuple[str, ...]) -> None:
    """Add labels to the ticket (and take some off with --remove)."""
    if not labels and not remove:
        raise click.UsageError("give labels to add, or --remove LABEL")
    change_ticket(obj, reference, lambda session, settings, ticket, now: (
        [], ["labels " + (", ".join(triage.label(session, ticket, labels, remove, now=now, actor=actor(settings)))
                          or "(none)")]))


@click.command()
@click.argument("reference")
@click.argument("into_reference")
@click.pass_obj
def merge(obj: Context, reference: str, into_reference: str) -> None:
    """Merge duplicate REFERENCE into INTO_REFERENCE; the duplicate's reporter is told."""

    def change(session, settings, ticket, now):  # type: ignore[no-untyped-def]
        into = reads.find(session, into_reference)
        triage.merge(session, settings, ticket, into, now=now, actor=actor(settings))
        return [], [f"merged into {into.reference}; its reporter was told"]

    change_ticket(obj, reference, change)


@click.command()
@click.argument("reference")
@click.option("--reason", required=True, type=click.Choice(CLOSE_REASONS), help="Why it is closed.")
@click.option("--force", is_flag=True, help="Close as fixed without a recorded release.")
@_update_options
@click.pass_obj
def close(obj: Context, reference: str, reason: str, force: bool, quiet: bool, message: str | None) -> None:
    """Close the ticket (it counts as resolved). The reporter is told why (unless --quiet)."""
    change_ticket(obj, reference, lambda session, settings, ticket, now: updates.close(
        session, settings, ticket, reason, now=now, actor=actor(settings), force=force,
        choice=updates.UpdateChoice(quiet, message)))


def __getattr__(verb: str) -> click.Command:
    """``intake <verb>`` of every milestone in MILESTONE_SPECS without a command of its own above
    (ack, resolve): a new milestone gets its command from its entry alone."""
    spec = next((spec for spec in MILESTONE_SPECS if spec.verb == verb), None)
    if spec is None:
        raise AttributeError(verb)
    return _milestone_command(spec.name)
