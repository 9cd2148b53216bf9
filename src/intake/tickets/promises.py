"""What the acknowledgement promises a reporter: only what will happen.

A stage's date is promised when the policy tracks it and the sweep tells maintainers about it
(:func:`intake.sla.deadlines.reminded`, the rule that gives it a stored ``notify_at``): its clock
runs (it is not waiting for a release, say) and it is not met. Where the policy's
``auto_ack_counts`` lets the automatic reply meet ``acknowledge``, that reply says it is the
acknowledgement and promises no other. A stage whose time depends on a severity nobody has
assessed yet is stored with its strictest date; the reply states the date each severity gives it
(:func:`dues_by_severity`, as the engine times a stage of known severity), so that the reporter reads which one will apply.

The policy is named by its title and link (``[policies.X] title``, ``url``), never by its config key.
"""

from __future__ import annotations

import email
import email.policy
from datetime import datetime

from intake.config.settings import Settings
from intake.language_tags import ENGLISH
from intake.send import composer
from intake.sla import deadlines
from intake.sla.calendars import CalendarConfig, add_duration, as_utc
from intake.sla.engine import StageConfig, StageDeadline
from intake.vocabulary import MILESTONE_SPEC, SEVERITIES, MailKind

Computed = list[tuple[StageDeadline, datetime | None]]


def initial_deadlines(settings: Settings, policy_name: str, received_at: datetime,
                      acknowledged_at: datetime | None) -> Computed:
    """A new ticket's deadlines; *acknowledged_at*: when its automatic reply was queued, if it was."""
    return deadlines.compute(settings, policy_name, deadlines.SlaInputs(received_at, None, {}, acknowledged_at, []))


def promised_dates(settings: Settings, policy_name: str, computed: Computed,
                   language: str = ENGLISH) -> list[composer.PromisedDate]:
    """The dates a new report's reply promises, from its *computed* deadlines (severity not
    known), each in its stage's time zone, written in *language*."""
    policy = settings.policies[policy_name]
    promised = []
    for deadline, met_at in computed:
        if not deadlines.reminded(deadline, met_at):
            continue  # met (by this very reply), not started or paused: nothing to promise
        stage = next(stage for stage in policy.stages if stage.name == deadline.stage)
        label = MILESTONE_SPEC[stage.milestone].stage_label if stage.milestone else stage.name
        calendar = deadlines.stage_calendar(settings, policy_name, deadline.stage)
        options = (dues_by_severity(stage, calendar, deadline.start)  # type: ignore[arg-type]
                   if deadline.severity_assumed else [])
        # Durations that differ may still end at one instant (48 hours, 2 business days): one date then.
        by_severity = tuple(composer.PromisedDate(_severity_words(severities), due, calendar.timezone,
                                                  severities=severities, language=language)
                            for due, severities in options) if len(options) > 1 else ()
        promised.append(composer.PromisedDate(label, deadline.due, calendar.timezone, by_severity=by_severity,
                                              milestone=stage.milestone, language=language))
    return promised


def dues_by_severity(stage: StageConfig, calendar: CalendarConfig,
                     start: datetime) -> list[tuple[datetime, tuple[str, ...]]]:
    """When *stage*, started at *start*, falls due under each severity (as
    :func:`intake.sla.engine.compute_deadlines` times it; no pause counted), the severities sharing
    an instant together, earliest first: the first is its due while severity is unknown, and a
    severity, once set, gives the instant it is listed with."""
    due_of: dict[str, datetime] = {}
    severities_at: dict[datetime, list[str]] = {}
    for severity in SEVERITIES:
        text = stage.duration_for(severity)
        if text not in due_of:
            due_of[text] = add_duration(as_utc("start", start), text, calendar)[0]
        severities_at.setdefault(due_of[text], []).append(severity)
    return sorted((due, tuple(severities)) for due, severities in severities_at.items())


def _severity_words(severities: tuple[str, ...]) -> str:
    """["critical", "high"] -> "critical or high"."""
    return " or ".join([", ".join(severities[:-1]), severities[-1]] if len(severities) > 1 else severities)


def automatic_reply(settings: Settings, *, policy_name: str, computed: Computed,
                    out_of_scope: bool, reference: str, subject: str, reporter_address: str,
                    reporter_name: str, intake_address: str, in_reply_to: str | None, references: list[str],
                    now: datetime, encryption: composer.Encryption | None = None,
                    language: str = ENGLISH) -> composer.OutgoingMail:
    """The automatic reply to a new report under *policy_name*: the acknowledgement stating
    :func:`promised_dates`, or the out-of-scope reply; encrypted with *encryption* if given,
    written in *language*."""
    policy = settings.policies[policy_name]
    return composer.automatic_reply(
        template="out-of-scope.txt.j2" if out_of_scope else "acknowledgement.txt.j2",
        kind=MailKind.OUT_OF_SCOPE if out_of_scope else MailKind.ACKNOWLEDGEMENT,
        reference=reference, subject=subject, reporter_address=reporter_address, reporter_name=reporter_name,
        intake_address=intake_address, from_name=settings.intake.from_name, in_reply_to=in_reply_to,
        references=references, deadlines=promised_dates(settings, policy_name, computed, language),
        policy=policy.public_title, policy_url=policy.url,
        acknowledges=any(met_at is not None for _, met_at in computed),  # only this reply meets a stage yet
        pauses_while_waiting=policy.pause_while_waiting,
        message_id_domain=settings.intake.message_id_domain, templates_dir=settings.templates_path, now=now,
        encryption=encryption, language=language)


# The report a preview acknowledges.
SAMPLE_SUBJECT = "XSS in the login form"
SAMPLE_REPORTER = ("Alice Researcher", "alice@researcher.example")


def preview(settings: Settings, policy_name: str, received_at: datetime, language: str = ENGLISH) -> str:
    """The text of the acknowledgement a report received at *received_at* under *policy_name*
    gets when it is answered at once, in *language* (``intake sla explain --acknowledgement``): the reply
    :func:`automatic_reply` renders for the first ticket of that year."""
    computed = initial_deadlines(settings, policy_name, received_at, acknowledged_at=received_at)
    mail = automatic_reply(
        settings, policy_name=policy_name, computed=computed, out_of_scope=False,
        reference=f"{settings.intake.reference_prefix}-{received_at:%Y}-0001", subject=SAMPLE_SUBJECT,
        reporter_address=SAMPLE_REPORTER[1], reporter_name=SAMPLE_REPORTER[0],
        intake_address=settings.smtp.addresses[0], in_reply_to=None, references=[], now=received_at,
        language=language)
    text = email.message_from_bytes(mail.raw, policy=email.policy.default).get_content()
    return text.replace("\r\n", "\n")  # as a terminal shows it, not as SMTP sends it
