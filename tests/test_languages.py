"""Mail to reporters in their language, through real parts: reports over SMTP to the real
listener, mail through the outbox to a real SMTP sink, the real CLI. The language comes from the
report's Content-Language / Accept-Language when ``[intake] languages`` offers it, is stored on
the ticket for every later mail, and is changed with ``intake language``; an offered language
without every reporter-facing template is a configuration error (78); security.txt states the
languages."""

from __future__ import annotations

import email
import email.policy
import json
import shutil
from datetime import datetime, timedelta, timezone

import pytest

from conftest import deliver_outbox, process, report, smtp_send
from intake import language_tags
from intake.send import localised
from intake.sla import reminders

POLICY = """
[policies.plain]
title = "Example disclosure policy"
calendar = "utc"
auto_ack_counts = false
keep_in_loop = "3 days"

[[policies.plain.stages]]
name = "acknowledge"
duration = "2 days"

[[policies.plain.stages]]
name = "disclose"
duration = "7 days"
start = "event:released"
"""
OFFERED = '["en", "de"]'
REPORTER = "alice@researcher.test"
# Independent of Babel: how German writes weekdays and months (Duden abbreviations, as CLDR has them).
GERMAN_WEEKDAYS = ("Mo.", "Di.", "Mi.", "Do.", "Fr.", "Sa.", "So.")
GERMAN_MONTHS = ("Jan.", "Feb.", "März", "Apr.", "Mai", "Juni", "Juli", "Aug.", "Sept.", "Okt.", "Nov.", "Dez.")


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


class Desk:
    """The listener and outbox of a configuration offering *languages*, and the sink."""

    def __init__(self, make_settings, start_intake_listener, sink, languages: str) -> None:  # type: ignore[no-untyped-def]
        self.settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
                                      INTAKE_INTAKE__DEFAULT_POLICY="plain", INTAKE_INTAKE__LANGUAGES=languages)
        self.running = start_intake_listener(self.settings)
        self.sink = sink

    def report(self, message_id: str = "<report@alice.test>", **headers: str) -> str:
        """Alice reports with *headers*; her ticket's reference."""
        message = report(subject="Auth bypass in admin", message_id=message_id)
        for name, value in headers.items():  # after the body: setting it drops Content-* headers
            message[name.replace("_", "-")] = value
        smtp_send(self.running.port, message)
        [reference] = process(self.settings, self.running.engine).tickets_opened
        return reference

    def write(self, subject: str, body: str) -> None:
        smtp_send(self.running.port, report(subject=subject, body=body))
        process(self.settings, self.running.engine)

    def sent(self, now: datetime | None = None) -> list[email.message.EmailMessage]:
        """The mail the outbox delivers at *now* (default: now) to the reporter, parsed."""
        before = len(self.sink.messages)
        count = deliver_outbox(self.settings, self.running.engine, now).get("sent", 0)
        return [email.message_from_bytes(m.data, policy=email.policy.default)
                for m in self.sink.wait_for(before + count)[before:] if m.rcpt_tos == [REPORTER]]


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink):  # type: ignore[no-untyped-def]
    config_file.write_text(config_file.read_text() + POLICY)
    return lambda languages=OFFERED: Desk(make_settings, start_intake_listener, sink, languages)


def _text(message: email.message.EmailMessage) -> str:
    return message.get_content().replace("\r\n", "\n")


def _german(instant: datetime) -> str:
    """*instant* (UTC) as the German mail must write it, with the names above."""
    return (f"{GERMAN_WEEKDAYS[instant.weekday()]}, {instant.day}. {GERMAN_MONTHS[instant.month - 1]} "
            f"{instant.year}, {instant:%H:%M} UTC")


def _stage_due(cli, reference: str, stage: str) -> datetime:  # type: ignore[no-untyped-def]
    stages = json.loads(cli("show", reference, "--json").output)["stages"]
    return datetime.fromisoformat(next(s["due"] for s in stages if s["stage"] == stage)).astimezone(timezone.utc)


def test_a_report_in_german_is_acknowledged_in_german_with_german_dates(desk, cli):
    office = desk()
    reference = office.report(Content_Language="de-DE")
    [acknowledgement] = office.sent()
    assert acknowledgement["Content-Language"] == "de"
    assert acknowledgement["Subject"] == f"Re: [{reference}] Auth bypass in admin"
    assert acknowledgement["In-Reply-To"] == "<report@alice.test>"
    text = _text(acknowledgement)
    assert text.startswith("Hallo Alice Researcher,\n\nvielen Dank für Ihre Meldung „Auth bypass in admin“.")
    assert f"und führen sie unter der Nummer {reference}." in text
    due = _stage_due(cli, reference, "acknowledge")
    assert f"- Bestätigung durch eine Person: bis {_german(due)}\n" in text
    assert "Sicherheitsrichtlinie\n„Example disclosure policy“.\n" in text
    assert "Thank you" not in text and " by " not in text
    shown = json.loads(cli("show", reference, "--json").output)
    assert shown["language"] == "de"
    assert "language de" in cli("show", reference).output


@pytest.mark.parametrize("headers", [
    {"Content_Language": "fr"},  # not offered
    {},  # nothing said
    {"Content_Language": "de-" + "x" * 300},  # too long to be a tag
    {"Content_Language": "de;q=1 <script>"},  # not a tag
    {"Accept_Language": "de;q=0, fr"},  # German explicitly not wanted
])
def test_a_report_in_a_language_not_offered_gets_english(desk, cli, headers):
    office = desk()
    reference = office.report(**headers)
    [acknowledgement] = office.sent()
    assert acknowledgement["Content-Language"] == "en"
    assert _text(acknowledgement).startswith("Hello Alice Researcher,\n\nThank you for your report")
    shown = cli("show", reference, "--json").output
    assert json.loads(shown)["language"] == "en"
    assert "script" not in shown and "xxxxxxxx" not in shown  # the header's text is never kept


def test_accept_language_chooses_when_content_language_does_not(desk):
    office = desk()
    office.report(Content_Language="fr", Accept_Language="fr-CA, it;q=0.9, de-AT;q=0.8, en;q=0.5")
    [acknowledgement] = office.sent()
    assert acknowledgement["Content-Language"] == "de" and _text(acknowledgement).startswith("Hallo")


def test_the_text_parts_content_language_chooses_in_multipart_mail(desk):
    office = desk()
    message = report(subject="Auth bypass in admin", body="Schritte:\n1. ...\n")
    message.add_alternative("<p>Schritte: 1. ...</p>", subtype="html")
    message.get_payload()[0]["Content-Language"] = "de-CH"
    smtp_send(office.running.port, message)
    process(office.settings, office.running.engine)
    [acknowledgement] = office.sent()
    assert acknowledgement["Content-Language"] == "de" and _text(acknowledgement).startswith("Hallo")


def test_later_mail_keeps_the_tickets_language_until_a_maintainer_changes_it(desk, cli):
    office = desk()
    reference = office.report(Content_Language="de")
    office.sent()
    # The reporter's reply carries no language: the ticket's stays.
    office.write(f"Re: [{reference}] Auth bypass in admin", "status\n")
    [status] = office.sent()
    assert status["Content-Language"] == "de"
    text = _text(status)
    assert f"Sie haben nach dem Stand Ihrer Meldung {reference} gefragt," in text
    assert "Stand: eingegangen; unser Team hat sie noch nicht bewertet." in text
    assert (f"Nächster zugesagter Termin:\n  Bestätigung durch eine Person, bis "
            f"{_german(_stage_due(cli, reference, 'acknowledge'))}\n") in text

    cli("ack", reference)
    cli("assess", reference, "--severity", "high")
    [assessed] = office.sent()
    assert assessed["Content-Language"] == "de"
    assert assessed["Subject"] == f"Re: [{reference}] Auth bypass in admin"
    assert "ihren Schweregrad als hoch eingestuft." in _text(assessed)

    cli("released", reference, "--version", "2.0.1")
    released, scheduled = office.sent()
    assert "ist jetzt veröffentlicht, in Version 2.0.1." in _text(released)
    assert f"am {_german(_stage_due(cli, reference, 'disclose'))} öffentlich bekanntzugeben." in _text(scheduled)

    assert "not an offered language" in cli("language", reference, "fr", code=1).output
    assert "language en" in cli("language", reference, "en-GB").output
    cli("close", reference, "--reason", "fixed")
    [closed] = office.sent()
    assert closed["Content-Language"] == "en" and "the issue is fixed." in _text(closed)
    events = json.loads(cli("show", reference, "--json").output)["events"]
    assert [(e["detail"]["from"], e["detail"]["to"]) for e in events if e["kind"] == "language-changed"] == [("de", "en")]


def test_the_keep_in_loop_mail_is_in_the_tickets_language(desk):
    office = desk()
    reference = office.report(Content_Language="de")
    office.sent()
    opened = datetime.now(timezone.utc)
    later = opened + timedelta(days=3, hours=1)
    sweep = reminders.sweep(office.running.engine, office.settings, later)
    assert [planned.reference for planned in sweep.keep_in_loop] == [reference]
    [kept] = office.sent(later)
    assert kept["Content-Language"] == "de"
    text = " ".join(_text(kept).split())
    assert f"an Ihrer Meldung {reference} („Auth bypass in admin“) wird weiter gearbeitet." in text
    assert "Wir haben Ihnen seit 3 Tagen nicht geschrieben" in text


def test_a_coordinated_disclosure_date_is_announced_and_reminded_in_german(desk, cli):
    office = desk()
    reference = office.report(Content_Language="de")
    office.sent()
    day = (datetime.now(timezone.utc) + timedelta(days=30)).date()
    german_day = f"{GERMAN_WEEKDAYS[day.weekday()]}, {day.day}. {GERMAN_MONTHS[day.month - 1]} {day.year}"
    cli("disclose-date", reference, day.isoformat())
    [scheduled] = office.sent()
    assert scheduled["Content-Language"] == "de"
    assert f"am {german_day} öffentlich bekanntzugeben." in " ".join(_text(scheduled).split())
    week_before = datetime.combine(day - timedelta(days=7), datetime.min.time(), timezone.utc) + timedelta(hours=1)
    reminders.sweep(office.running.engine, office.settings, week_before)
    # (the policy's keep-in-loop mail is due by then too)
    [reminder] = [mail for mail in office.sent(week_before) if "zur Erinnerung" in _text(mail)]
    assert reminder["Content-Language"] == "de"
    assert f"am {german_day} öffentlich bekanntzugeben, in 7 Tagen." in " ".join(_text(reminder).split())


def test_a_merged_reports_notice_and_the_preview_are_in_german(desk, cli):
    office = desk()
    first = office.report()
    second = office.report(message_id="<again@alice.test>", Content_Language="de")
    office.sent()
    cli("merge", second, first)
    [notice] = office.sent()
    assert notice["Content-Language"] == "de"
    assert f"nochmals vielen Dank für Ihre Meldung {second}." in _text(notice)
    assert f"gemeinsam unter {first}." in " ".join(_text(notice).split())

    preview = cli("sla", "explain", "--policy", "plain", "--received", "2026-12-03T05:40:00Z", "--acknowledgement",
                  "--language", "de").output
    assert "- Bestätigung durch eine Person: bis Sa., 5. Dez. 2026, 05:40 UTC\n" in preview
    assert "not offered" in cli("sla", "explain", "--policy", "plain", "--received", "2026-12-03T05:40:00Z",
                                "--acknowledgement", "--language", "fr", code=2).output


def test_a_language_no_longer_offered_falls_back_to_english(desk, cli, monkeypatch):
    office = desk()
    reference = office.report(Content_Language="de")
    office.sent()
    monkeypatch.setenv("INTAKE_INTAKE__LANGUAGES", '["en"]')  # the operator takes German back
    cli("ack", reference)
    cli("assess", reference, "--severity", "low")
    [assessed] = office.sent()
    assert assessed["Content-Language"] == "en" and "rated\nits severity low." in _text(assessed)
    assert "language de" in cli("show", reference).output  # kept: offered again, it applies again


def test_an_offered_language_without_its_templates_is_a_configuration_error(cli, config_file, tmp_path, monkeypatch):
    monkeypatch.setenv("INTAKE_INTAKE__LANGUAGES", '["en", "fr"]')
    output = cli("check-config", code=78).output
    assert "'fr' lacks" in output
    assert all(name in output for name in localised.reporter_templates())

    # The operator's folder: fr/ with all but one template -> that one is named; with it -> OK.
    folder = tmp_path / "templates"
    (folder / "fr").mkdir(parents=True)
    for name in localised.reporter_templates():
        shutil.copy(localised.SHIPPED / name, folder / "fr" / name)
    (folder / "fr" / "status.txt.j2").unlink()
    monkeypatch.setenv("INTAKE_INTAKE__TEMPLATES_DIR", str(folder))
    output = cli("check-config", code=78).output
    assert "'fr' lacks status.txt.j2 (" in output
    shutil.copy(localised.SHIPPED / "status.txt.j2", folder / "fr" / "status.txt.j2")
    assert "OK" in cli("check-config").output


@pytest.mark.parametrize(("languages", "message"), [
    ('["de"]', "'en' must be listed"),
    ('["en", "en_US"]', "is not a language tag"),
    ('["en", "de", "DE"]', "listed twice"),
])
def test_languages_are_validated(cli, monkeypatch, languages, message):
    monkeypatch.setenv("INTAKE_INTAKE__LANGUAGES", languages)
    assert message in cli("check-config", code=78).output


def test_an_operators_language_is_used_with_its_dates(desk, cli, config_file, tmp_path):
    folder = tmp_path / "templates"
    (folder / "fr").mkdir(parents=True)
    for name in localised.reporter_templates():
        shutil.copy(localised.SHIPPED / name, folder / "fr" / name)
    (folder / "fr" / "acknowledgement.txt.j2").write_text(
        "Bonjour,\n{% for stage in deadlines %}{{ stage.label }} : {{ stage.due_local }}\n{% endfor %}", "utf-8")
    config_file.write_text(config_file.read_text().replace('# templates_dir = "templates"',
                                                           f'templates_dir = "{folder}"'))
    office = desk('["en", "de", "fr"]')
    reference = office.report(Content_Language="fr-CH")
    [acknowledgement] = office.sent()
    assert acknowledgement["Content-Language"] == "fr"
    due = _stage_due(cli, reference, "acknowledge")
    french_months = ("janv.", "févr.", "mars", "avr.", "mai", "juin", "juil.", "août", "sept.", "oct.", "nov.", "déc.")
    assert _text(acknowledgement).startswith("Bonjour,\nAcknowledgement by a person : ")
    assert f"{due.day} {french_months[due.month - 1]} {due.year}, {due:%H:%M}" in _text(acknowledgement)


def test_security_txt_states_the_offered_languages_unless_told_otherwise(cli, config_file, monkeypatch):
    monkeypatch.setenv("INTAKE_SECURITY_TXT__EXPIRES", "2099-01-01T00:00:00Z")
    assert "Preferred-Languages" not in cli("security-txt").output  # English only: RFC 9116 assumes it
    monkeypatch.setenv("INTAKE_INTAKE__LANGUAGES", OFFERED)
    assert "Preferred-Languages: en, de\n" in cli("security-txt").output
    assert "preferred_languages" not in cli("check-config").stderr

    monkeypatch.setenv("INTAKE_SECURITY_TXT__PREFERRED_LANGUAGES", '["en", "de", "fr"]')
    assert "Preferred-Languages: en, de, fr\n" in cli("security-txt").output  # the explicit list wins
    warning = cli("check-config").stderr
    assert "warning: security_txt.preferred_languages (de, en, fr) differs from intake.languages (de, en)" in warning


def test_the_shipped_german_has_every_reporter_template():
    assert localised.missing_templates("de", None) == []
    assert "acknowledgement.txt.j2" in localised.reporter_templates()
    assert not set(localised.reporter_templates()) & localised.MAINTAINER_TEMPLATES


@pytest.mark.parametrize(("header", "offered", "chosen"), [
    ("de-DE", ["en", "de"], "de"),
    ("DE-at-1996", ["en", "de-AT"], "de-AT"),
    ("zh-Hant-TW", ["en", "zh-Hant"], "zh-Hant"),
    ("fr, de", ["en", "de"], "de"),
    ("x-klingon, de", ["en", "de"], "de"),
    ("de\u00e4", ["en", "de"], "en"),
    (",".join(["fr"] * 20) + ",de", ["en", "de"], "en"),  # past MAX_RANGES: not read
    ("", ["en", "de"], "en"),
])
def test_content_language_lookup(header, offered, chosen):
    assert language_tags.choose(offered, content=header) == chosen
