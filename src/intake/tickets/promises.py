"""What the acknowledgement promises a reporter: only what will happen.

A stage's date is promised when the policy tracks it and the sweep reminds maintainers of it: the
stage's clock runs (it is not waiting for a release, say), it is not met (where the policy's
``auto_ack_counts`` lets the automatic reply meet ``acknowledge``, that reply is the
acknowledgement and promises no other), and it has a first notice
(:func:`intake.sla.deadlines.first_notice_at`, the stored ``notify_at``). A stage whose time depends
on a severity nobody has assessed yet is stored with its strictest date; the reply states the
date the engine gives each severity, so that the reporter reads which one will apply.

The policy is named by its title and link (``[policies.X] title``, ``url``), never by its config key.
"""

from __future__ import annotations

import email
import email.policy
from datetime import datetime

from intake.config.settings import Settings
from intake.send import composer
from intake.sla import deadlines
from intake.sla.engine import StageDeadline, compute_deadlines
from intake.vocabulary import MILESTONE_SPEC, SEVERITIES, MailKind

Computed = list[tuple[StageDeadline, datetime | None]]


def initial_deadlines(settings: Settings, policy_name: str, received_at: datetime,
                      acknowledged_at: datetime | None) -> Computed:
    """A new ticket's deadlines; *acknowledged_at*: when its automatic reply was queued, if it was."""
    return deadlines.compute(settings, policy_name, deadlines.SlaInputs(received_at, None, {}, acknowledged_at, []))


def promised_dates(settings: Settings, policy_name: str, received_at: datetime,
                   computed: Computed) -> list[composer.PromisedDate]:
    """The dates a new report's reply promises, from its *computed* deadlines (received at
    *received_at*, severity not known), each in its stage's time zone."""
    policy = settings.policies[policy_name]
    met = {deadline.stage: met_at for deadline, met_at in computed if met_at is not None}
    severity_dates = (_dates_by_severity(settings, policy_name, received_at, met)
                      if any(deadline.severity_assumed for deadline, _ in computed) else {})
    promised = []
    for deadline, met_at in computed:
        if deadlines.first_notice_at(settings, policy_name, None, deadline, met_at) is None:
            continue  # met (by this very reply), not started or paused: nobody is reminded of it
        stage = policy.stage(deadline.stage)
        label = MILESTONE_SPEC[stage.milestone].stage_label if stage and stage.milestone else deadline.stage
        zone = deadlines.stage_calendar(settings, policy_name, deadline.stage).timezone
        options = severity_dates.get(deadline.stage, []) if deadline.severity_assumed else []
        by_severity = tuple(composer.PromisedDate(_severity_words(severities), due, zone)
                            for due, severities in options)
        promised.append(composer.PromisedDate(label, deadline.due, zone, by_severity=by_severity))
    return promised


def _dates_by_severity(settings: Settings, policy_name: str, received_at: datetime,
                       met: dict[str, datetime]) -> dict[str, list[tuple[datetime, list[str]]]]:
    """Each dated stage's due instant once a severity is set, as the engine computes it, with the
    severities that give each instant; earliest first (the first is the stored, strictest one)."""
    policy = settings.policies[policy_name]
    by_stage: dict[str, dict[datetime, list[str]]] = {}
    for severity in SEVERITIES:
        for deadline in compute_deadlines(policy, settings.all_calendars, received_at=received_at,
                                          severity=severity, met=met):
            if deadline.due is not None:
                by_stage.setdefault(deadline.stage, {}).setdefault(deadline.due, []).append(severity)
    return {stage: sorted(dues.items()) for stage, dues in by_stage.items()}


def _severity_words(severities: list[str]) -> str:
    """["critical", "high"] -> "critical or high"."""
    return " or ".join([", ".join(severities[:-1]), severities[-1]] if len(severities) > 1 else severities)


def automatic_reply(settings: Settings, *, policy_name: str, received_at: datetime, computed: Computed,
                    out_of_scope: bool, reference: str, subject: str, reporter_address: str,
                    reporter_name: str, intake_address: str, in_reply_to: str | None, references: list[str],
                    now: datetime) -> composer.OutgoingMail:
    """The automatic reply to a new report under *policy_name*: the acknowledgement stating
    :func:`promised_dates`, or the out-of-scope reply."""
    policy = settings.policies[policy_name]
    return composer.automatic_reply(
        template="out-of-scope.txt.j2" if out_of_scope else "acknowledgement.txt.j2",
        kind=MailKind.OUT_OF_SCOPE if out_of_scope else MailKind.ACKNOWLEDGEMENT,
        reference=reference, subject=subject, reporter_address=reporter_address, reporter_name=reporter_name,
        intake_address=intake_address, from_name=settings.intake.from_name, in_reply_to=in_reply_to,
        references=references, deadlines=promised_dates(settings, policy_name, received_at, computed),
        policy=policy.public_title, policy_url=policy.url,
        acknowledges=any(met_at is not None for _, met_at in computed),
        pauses_while_waiting=policy.pause_while_waiting,
        message_id_domain=settings.intake.message_id_domain, templates_dir=settings.templates_path, now=now)


# The report a preview acknowledges.
SAMPLE_SUBJECT = "XSS in the login form"
SAMPLE_REPORTER = ("Alice Researcher", "alice@researcher.example")


def preview(settings: Settings, policy_name: str, received_at: datetime) -> str:
    """The text of the acknowledgement a report received at *received_at* under *policy_name*
    gets when it is answered at once (``intake sla explain --acknowledgement``): the reply
    :func:`automatic_reply` renders for the first ticket of that year."""
    computed = initial_deadlines(settings, policy_name, received_at, acknowledged_at=received_at)
    mail = automatic_reply(
        settings, policy_name=policy_name, received_at=received_at, computed=computed, out_of_scope=False,
        reference=f"{settings.intake.reference_prefix}-{received_at:%Y}-0001", subject=SAMPLE_SUBJECT,
        reporter_address=SAMPLE_REPORTER[1], reporter_name=SAMPLE_REPORTER[0],
        intake_address=settings.smtp.addresses[0], in_reply_to=None, references=[], now=received_at)
    text = email.message_from_bytes(mail.raw, policy=email.policy.default).get_content()
    return text.replace("\r\n", "\n")  # as a terminal shows it, not as SMTP sends it
