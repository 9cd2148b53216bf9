"""The three real policies, built from the same TOML that config.toml ships.

Every expected instant is worked out by hand in the comment beside it.
Brisbane is UTC+10 all year (AEST, no DST).
"""

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from intake.sla.calendars import CalendarConfig
from intake.sla.engine import PolicyConfig, acknowledge_met_at, compute_deadlines, stage_state, validate_policies

BRISBANE = ZoneInfo("Australia/Brisbane")

POLICIES_TOML = """
[calendars.aest]
timezone = "Australia/Brisbane"   # AEST all year: Queensland has no daylight saving
workdays = ["mon", "tue", "wed", "thu", "fri"]
working_hours = "09:00-17:00"
holidays_country = "AU"           # Australian national public holidays, no state's
extra_holidays = []

[policies.vaixus]
description = "Vaixus security policy (June 2026), section 9"
calendar = "utc"
auto_ack_counts = false
pause_while_waiting = false

[[policies.vaixus.stages]]
name = "acknowledge"
duration = "72 hours"

[policies.vectis-mail]
description = "Vectis Mail SECURITY.md"
calendar = "aest"
auto_ack_counts = false
pause_while_waiting = false

[[policies.vectis-mail.stages]]
name = "acknowledge"
duration = "2 business days"

[[policies.vectis-mail.stages]]
name = "assess"
duration = "5 business days"

[[policies.vectis-mail.stages]]
name = "fix"
duration = "90 days"
by_severity = { critical = "30 days", high = "30 days" }

[[policies.vectis-mail.stages]]
name = "disclose"
duration = "7 days"
start = "event:released"

[policies.emailconnect]
description = "EmailConnect security page, 'What to expect'"
calendar = "utc"
auto_ack_counts = true
pause_while_waiting = false

[[policies.emailconnect.stages]]
name = "acknowledge"
duration = "24 hours"

[[policies.emailconnect.stages]]
name = "assess"
duration = "7 days"

[[policies.emailconnect.stages]]
name = "resolve"
duration = "90 days"
"""


def load(raw):
    """The calendars and policies of a parsed config.toml, validated as the service does."""
    calendars = {name: CalendarConfig.model_validate(body) for name, body in raw["calendars"].items()}
    policies = {name: PolicyConfig.model_validate(body) for name, body in raw["policies"].items()}
    validate_policies(policies, calendars)
    return policies, calendars


POLICIES, CALENDARS = load(tomllib.loads(POLICIES_TOML))


def dues(policy_name, **kwargs):
    deadlines = compute_deadlines(POLICIES[policy_name], CALENDARS, **kwargs)
    return {deadline.stage: deadline for deadline in deadlines}


def bne(*args):
    return datetime(*args, tzinfo=BRISBANE)


def utc(*args):
    return datetime(*args, tzinfo=UTC)


def test_the_toml_shape_loads_into_the_expected_stages():
    assert [stage.name for stage in POLICIES["vaixus"].stages] == ["acknowledge"]
    assert [stage.name for stage in POLICIES["vectis-mail"].stages] == ["acknowledge", "assess", "fix", "disclose"]
    assert [stage.name for stage in POLICIES["emailconnect"].stages] == ["acknowledge", "assess", "resolve"]
    assert POLICIES["vaixus"].calendar == "utc"
    assert CALENDARS["aest"].holidays_subdivision is None


def test_the_shipped_config_toml_keeps_the_contract():
    # The repository's config.toml must configure these policies exactly as above
    # (descriptions aside): a drift there changes promises made to reporters.
    shipped = Path(__file__).resolve().parents[1] / "config.toml"
    policies, calendars = load(tomllib.loads(shipped.read_text(encoding="utf-8")))
    # What a low-quality report is answered with, and how the policy is named, are no deadline.
    # Nor is the reporter's keep-in-loop mail (asserted below).
    not_sla = {"description", "title", "url", "low_quality_reply", "keep_in_loop"}
    for name, expected in POLICIES.items():
        assert policies[name].model_dump(exclude=not_sla) == expected.model_dump(exclude=not_sla), name
    assert calendars["aest"] == CALENDARS["aest"]
    # Vaixus (section 10) and EmailConnect rule automated scanning and spam out of scope; Vectis does not.
    assert {name: policies[name].low_quality_reply for name in POLICIES} == {
        "vaixus": "out-of-scope", "vectis-mail": "acknowledge", "emailconnect": "out-of-scope"}
    # Each promises progress over fixes that may take months (README, "Keep-in-loop"): a mail a month.
    assert {name: policies[name].keep_in_loop_span for name in POLICIES} == dict.fromkeys(POLICIES, timedelta(days=30))


# --- vaixus: acknowledge within 72 elapsed hours, only a human reply counts ---


def test_vaixus_72_hours_ignore_the_weekend():
    # Fri 27 Mar 2026 23:59 UTC + 72 h = Sat 23:59, Sun 23:59, Mon 30 Mar 23:59 UTC.
    (ack,) = dues("vaixus", received_at=utc(2026, 3, 27, 23, 59)).values()
    assert ack.due == utc(2026, 3, 30, 23, 59)
    assert ack.basis == "72 hours from receipt"


def test_vaixus_across_leap_day():
    # Mon 28 Feb 2028 12:00 + 72 h: Tue 29 Feb, Wed 1 Mar, Thu 2 Mar 12:00 (a non-leap year would give 3 Mar).
    assert dues("vaixus", received_at=utc(2028, 2, 28, 12))["acknowledge"].due == utc(2028, 3, 2, 12)


def test_vaixus_counts_a_human_reply_not_the_auto_ack():
    policy = POLICIES["vaixus"]
    auto, human = utc(2026, 6, 1, 10, 0, 5), utc(2026, 6, 3, 9)
    assert acknowledge_met_at(policy, auto_ack_sent_at=auto, first_human_reply_at=None) is None
    assert acknowledge_met_at(policy, auto_ack_sent_at=auto, first_human_reply_at=human) == human


def test_vaixus_states_around_the_deadline():
    # Received Mon 1 Jun 2026 10:00 UTC, so due Thu 4 Jun 10:00 UTC.
    (ack,) = dues("vaixus", received_at=utc(2026, 6, 1, 10)).values()
    soon = timedelta(hours=12)
    assert stage_state(ack, None, utc(2026, 6, 3, 21, 59), soon) == "ok"  # 12 h 01 min left
    assert stage_state(ack, None, utc(2026, 6, 3, 22), soon) == "due-soon"  # exactly 12 h left
    assert stage_state(ack, None, utc(2026, 6, 4, 10), soon) == "due-soon"  # at the due instant
    assert stage_state(ack, None, utc(2026, 6, 4, 10, 0, 1), soon) == "breached"
    assert stage_state(ack, utc(2026, 6, 4, 10), utc(2026, 6, 9), soon) == "met"
    assert stage_state(ack, utc(2026, 6, 4, 10, 1), utc(2026, 6, 9), soon) == "met-late"


# --- vectis-mail: Brisbane business days, AU national holidays ---


def test_vectis_christmas_eve_report():
    deadlines = dues("vectis-mail", received_at=bne(2026, 12, 24, 10))
    # acknowledge, 2 business days from Thu 24 Dec 10:00: Fri 25 Christmas, Sat 26 and Sun 27
    # weekend; Mon 28 is day 1 (AU national has no observed Boxing Day), Tue 29 is day 2.
    assert deadlines["acknowledge"].due == bne(2026, 12, 29, 10)
    assert deadlines["acknowledge"].basis == (
        "2 business days in Australia/Brisbane from receipt; "
        "skipped Fri 25 Dec (Christmas Day), Sat 26 Dec (weekend), Sun 27 Dec (weekend)"
    )
    # assess, 5 business days: Mon 28 (1), Tue 29 (2), Wed 30 (3), Thu 31 (4),
    # Fri 1 Jan New Year's Day, Sat 2 / Sun 3 weekend, Mon 4 Jan (5).
    assert deadlines["assess"].due == bne(2027, 1, 4, 10)
    assert deadlines["assess"].basis.endswith("Fri 1 Jan (New Year's Day), Sat 2 Jan (weekend), Sun 3 Jan (weekend)")
    # fix, severity unknown: strictest is 30 days; 24 Dec + 7 = 31 Dec, + 23 = 23 Jan 2027.
    assert deadlines["fix"].due == bne(2027, 1, 23, 10)
    assert deadlines["fix"].severity_assumed
    assert deadlines["fix"].basis == "30 days (severity unknown: strictest) from receipt"
    # disclose waits for the release.
    assert deadlines["disclose"].due is None and deadlines["disclose"].start is None
    assert deadlines["disclose"].basis == "starts when event 'released' is recorded"


def test_vectis_with_queensland_holidays_skips_the_observed_boxing_day():
    # Not the configured policy: shows what holidays_subdivision = "QLD" would change.
    queensland = CalendarConfig.model_validate(CALENDARS["aest"].model_dump() | {"holidays_subdivision": "QLD"})
    (ack, *_) = compute_deadlines(POLICIES["vectis-mail"], {"aest": queensland}, received_at=bne(2026, 12, 24, 10))
    # Mon 28 Dec is now Boxing Day (observed): Tue 29 is day 1, Wed 30 day 2.
    assert ack.due == bne(2026, 12, 30, 10)
    assert "Mon 28 Dec (Boxing Day (observed))" in ack.basis


def test_vectis_easter_2027():
    deadlines = dues("vectis-mail", received_at=bne(2027, 3, 25, 14, 30))
    # From Thu 25 Mar 14:30: Fri 26 Good Friday, Sat 27 / Sun 28 weekend, Mon 29 Easter Monday;
    # Tue 30 (1), Wed 31 (2).
    assert deadlines["acknowledge"].due == bne(2027, 3, 31, 14, 30)
    assert deadlines["acknowledge"].basis.endswith(
        "skipped Fri 26 Mar (Good Friday), Sat 27 Mar (weekend), Sun 28 Mar (weekend), Mon 29 Mar (Easter Monday)"
    )
    # Tue 30 (1), Wed 31 (2), Thu 1 Apr (3), Fri 2 Apr (4), weekend, Mon 5 Apr (5).
    assert deadlines["assess"].due == bne(2027, 4, 5, 14, 30)


def test_vectis_friday_1500_and_saturday_examples():
    # The contract's own examples: Fri 15:00 + 2 business days = Tue 15:00;
    # Sat 10:00 starts Mon 00:00, so + 2 business days = Wed 00:00.
    assert dues("vectis-mail", received_at=bne(2026, 11, 27, 15))["acknowledge"].due == bne(2026, 12, 1, 15)
    assert dues("vectis-mail", received_at=bne(2026, 11, 28, 10))["acknowledge"].due == bne(2026, 12, 2, 0)


def test_vectis_friday_2359_report():
    deadlines = dues("vectis-mail", received_at=bne(2026, 11, 27, 23, 59))
    # Fri 27 Nov 23:59 is still Friday: Mon 30 Nov (1), Tue 1 Dec (2) at 23:59.
    assert deadlines["acknowledge"].due == bne(2026, 12, 1, 23, 59)
    # Mon (1), Tue (2), Wed (3), Thu (4), Fri 4 Dec (5) at 23:59.
    assert deadlines["assess"].due == bne(2026, 12, 4, 23, 59)


def test_vectis_uses_brisbane_dates_not_utc_dates():
    # Sat 28 Nov 00:30 in Brisbane is still Fri 14:30 in UTC. Brisbane's Saturday counts:
    # the clock starts Mon 30 Nov 00:00, 2 business days end Wed 2 Dec 00:00.
    received = utc(2026, 11, 27, 14, 30)
    assert received.astimezone(BRISBANE) == bne(2026, 11, 28, 0, 30)
    assert dues("vectis-mail", received_at=received)["acknowledge"].due == bne(2026, 12, 2, 0)


def test_vectis_leap_day():
    deadlines = dues("vectis-mail", received_at=bne(2028, 2, 28, 9), severity="critical")
    # Mon 28 Feb 2028: Tue 29 Feb (1), Wed 1 Mar (2).
    assert deadlines["acknowledge"].due == bne(2028, 3, 1, 9)
    # 30 days: Feb 29 is day 1, Mar 1..29 are days 2..30.
    assert deadlines["fix"].due == bne(2028, 3, 29, 9)
    # Received on the leap day itself, Tue 29 Feb 12:00: Wed 1 (1), Thu 2 (2), Fri 3 (3), Mon 6 (4), Tue 7 Mar (5).
    assert dues("vectis-mail", received_at=bne(2028, 2, 29, 12))["assess"].due == bne(2028, 3, 7, 12)


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        # 30 days from Thu 24 Dec 2026 10:00 = Sat 23 Jan 2027 10:00.
        ("critical", bne(2027, 1, 23, 10)),
        ("high", bne(2027, 1, 23, 10)),
        # 90 days: Dec 31 is +7, Jan 31 +38, Feb 28 +66 (2027 is not a leap year), Mar 24 +90.
        ("medium", bne(2027, 3, 24, 10)),
        ("low", bne(2027, 3, 24, 10)),
        ("none", bne(2027, 3, 24, 10)),
    ],
)
def test_vectis_fix_follows_severity_once_assessed(severity, expected):
    fix = dues("vectis-mail", received_at=bne(2026, 12, 24, 10), severity=severity)["fix"]
    assert fix.due == expected
    assert not fix.severity_assumed
    assert "severity unknown" not in fix.basis


def test_vectis_disclose_starts_at_release():
    received = bne(2026, 12, 24, 10)
    pending = dues("vectis-mail", received_at=received)["disclose"]
    assert stage_state(pending, None, bne(2027, 6, 1), timedelta(days=1)) == "pending"
    # Released Mon 1 Feb 2027 09:00 + 7 days = Mon 8 Feb 09:00.
    released = dues("vectis-mail", received_at=received, events={"released": bne(2027, 2, 1, 9)})["disclose"]
    assert released.start == bne(2027, 2, 1, 9)
    assert released.due == bne(2027, 2, 8, 9)
    assert released.basis == "7 days from event 'released'"
    assert stage_state(released, None, bne(2027, 2, 8, 9, 1), timedelta(days=1)) == "breached"


# --- emailconnect: elapsed 24 hours / 7 days / 90 days from receipt ---


def test_emailconnect_friday_2359():
    deadlines = dues("emailconnect", received_at=utc(2026, 7, 31, 23, 59))
    assert deadlines["acknowledge"].due == utc(2026, 8, 1, 23, 59)  # + 24 h
    assert deadlines["assess"].due == utc(2026, 8, 7, 23, 59)  # Fri + 7 days = next Fri
    # + 90 days: Aug 31 is +31, Sep 30 +61, Oct 29 +90.
    assert deadlines["resolve"].due == utc(2026, 10, 29, 23, 59)


def test_emailconnect_leap_year():
    deadlines = dues("emailconnect", received_at=utc(2028, 2, 28, 12))
    assert deadlines["acknowledge"].due == utc(2028, 2, 29, 12)
    # Feb 29 (+1), Mar 1..6 (+2..+7).
    assert deadlines["assess"].due == utc(2028, 3, 6, 12)
    # Feb 29 is +1, Mar 31 +32, Apr 30 +62, May 28 +90.
    assert deadlines["resolve"].due == utc(2028, 5, 28, 12)


def test_emailconnect_counts_the_auto_ack():
    auto, human = utc(2026, 6, 1, 10, 0, 5), utc(2026, 6, 2, 9)
    assert acknowledge_met_at(POLICIES["emailconnect"], auto_ack_sent_at=auto, first_human_reply_at=human) == auto


def test_emailconnect_ignores_pauses():
    # The policy does not pause while waiting on the reporter.
    received = utc(2026, 6, 1)
    deadlines = dues("emailconnect", received_at=received, pauses=[(utc(2026, 6, 1, 1), None)])
    assert deadlines["acknowledge"].due == utc(2026, 6, 2)
    assert stage_state(deadlines["acknowledge"], None, utc(2026, 6, 1, 12), timedelta(hours=1)) == "ok"
