"""Bounded cost by construction (issue 12, finding 1): every pattern on senders' text runs on RE2,
the regex work on hostile mail grows linearly with it (counted, not timed), and no text work runs
while the write lock is held."""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest

import adversarial
from conftest import all_tickets, process, report, smtp_send
from intake import patterns
from intake.run import processor
from intake.send import composer
from intake.tickets import credit, maintainer_mail
from intake.understand import body_text, bounces, credit_words, lookups, parse, quality, route, text_work
from intake.understand.quality import SHIPPED_RULES, RulesError, load_rules, parse_rules
from intake.vocabulary import REPORTER_REPLY


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


# -- the engine -----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [credit, credit_words, maintainer_mail, text_work, route, quality, parse], ids=lambda m: m.__name__)
def test_modules_reading_senders_text_compile_no_backtracking_pattern(module):
    backtracking = [name for name, value in vars(module).items() if isinstance(value, re.Pattern)]
    assert backtracking == [] and not hasattr(module, "re")


def test_every_pattern_applied_to_senders_text_is_an_re2_pattern(make_settings):
    settings = make_settings()
    rules = load_rules(SHIPPED_RULES)
    compiled = [getattr(rule, key) for rule in rules.rules
                for key in ("subject", "body", "subject_or_body", "body_absent", "body_ignore")]
    assert all(isinstance(p, patterns.Pattern) for group in compiled if group for p in group)
    config = lookups.routing_config(settings)
    assert isinstance(config.reference_pattern, patterns.Pattern)
    assert isinstance(config.reply_address_tag, patterns.Pattern)
    assert isinstance(credit_words._QUOTE_HEADER, patterns.Pattern)  # the pattern of the 39 s reply
    assert isinstance(composer._REPLY_PREFIX, patterns.Pattern)
    assert settings.never_answered("no-reply@example.org") and not settings.never_answered("alice@example.org")


def test_never_answered_is_any_one_pattern_matching_the_whole_local_part_and_follows_a_reload(make_settings):
    """The never_reply_to patterns are matched as one: still each on the whole local part, any case,
    and a reloaded configuration's own list applies (nothing is kept from the previous one)."""
    settings = make_settings()
    each = [patterns.compile(p, ignorecase=True) for p in settings.autoreply.never_reply_to]
    for local in ["MAILER-DAEMON", "noreply", "no-reply", "bounce", "bounces", "alice", "noreply-alice",
                  "alice-noreply", "postmaster", "daemonx", ""]:
        assert settings.never_answered(f"{local}@example.org") == any(p.fullmatch(local.lower()) for p in each)
    reloaded = make_settings(INTAKE_AUTOREPLY__NEVER_REPLY_TO='["alice|b.b", "carol"]')
    assert reloaded.never_answered("Alice@example.org") and reloaded.never_answered("bob@example.org")
    assert reloaded.never_answered("carol@example.org") and not reloaded.never_answered("alicecarol@example.org")
    assert not reloaded.never_answered("noreply@example.org") and settings.never_answered("noreply@example.org")
    assert not make_settings(INTAKE_AUTOREPLY__NEVER_REPLY_TO="[]").never_answered("noreply@example.org")


def test_the_reference_patterns_kept_on_a_routing_config_are_those_of_its_settings(make_settings):
    """The reference patterns are derived once per routing config; one built from a reloaded
    configuration with another prefix reads that prefix, not the previous one's."""
    before = lookups.routing_config(make_settings())
    assert before.reference_pattern.search("Re: [SEC-2026-0001] x") and before.reference_pattern is before.reference_pattern
    after = lookups.routing_config(make_settings(INTAKE_INTAKE__REFERENCE_PREFIX="VULN"))
    assert after.reference_pattern.search("[VULN-2026-0002]") and not after.reference_pattern.search("[SEC-2026-0001]")
    assert after.reply_address_tag.fullmatch("vuln-2026-0002.abc") and not after.reply_address_tag.fullmatch("sec-2026-0002.abc")


@pytest.mark.parametrize("pattern", [r"(?<!\d)5\.1\.1", r"(a)\1", r"x(?=y)", r"end\Z"])
def test_constructs_re2_lacks_are_refused(pattern):
    with pytest.raises(patterns.UnsupportedPattern, match="linear-time engine"):
        patterns.compile(pattern)


def test_a_rules_file_re2_cannot_run_fails_check_config(cli, config_file, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('threshold = 1.0\n[[rule]]\nname = "lookbehind"\ndescription = "x"\nscore = 1.0\n'
                     "body = ['(?<!not )bounty']\n")
    with pytest.raises(RulesError, match=r"lookbehind.*not a valid regular expression \(RE2"):
        load_rules(rules)
    config_file.write_text(config_file.read_text().replace('# quality_rules = "low-quality.toml"',
                                                           f'quality_rules = "{rules}"'))
    assert "RE2" in cli("check-config", code=78).output


def test_a_never_reply_to_pattern_re2_cannot_run_fails_check_config(cli, config_file):
    text = config_file.read_text()
    config_file.write_text(text.replace('never_reply_to = ["mailer-daemon"', 'never_reply_to = ["(?<=x)y", "mailer-daemon"'))
    assert "RE2" in cli("check-config", code=78).output


def test_lookarounds_rewritten_for_re2_mean_what_they_meant():
    assert credit_words.recognise("credit me as Jane Doe (@janed), not bob@example.org").handle == "@janed"
    assert credit_words.recognise("credit me as Jane Doe, see https://x.example/@nobody").handle is None
    assert credit_words.recognise("Credit: J. R. O'Brien. Thanks!").name == "J. R. O'Brien"
    assert credit_words.recognise("Credit: 'Jane Doe'").name == "Jane Doe"
    assert bounces._status_code("Status: 5.1.1") == "5.1.1"
    assert bounces._status_code("v1.5.1.10 then 4.4.7 (delayed)") == "4.4.7"
    assert bounces._status_code("build 2.0.0.1") is None
    assert quality.parse_rules('threshold = 1.0\n[[rule]]\nname = "link"\ndescription = "x"\nscore = 1.0\n'
                            "body_absent = ['https?://[^\\s/]+/\\S*']\n"
                            "body_ignore = ['https?://mxtoolbox\\.com\\S*']\n").score(
        parse.parse(b"Subject: x\r\n\r\nSee https://mxtoolbox.com/SuperTool.aspx\r\n")).low_quality


# -- finding 1 reproduced: the reply of blank lines ------------------------------------------------


@pytest.mark.timeout(30)  # a hang guard: on the backtracking engine this is hours (5k lines: 0.24 s, 40k: 16.8 s)
def test_a_reply_of_a_million_blank_lines_is_read_in_one_pass():
    reply = "Please credit me as Jane Doe.\n" + "\n" * 1_000_000 + "On Mon, Alice wrote:\n> credit me as Bob\n"
    assert credit_words.own_words(reply).startswith("Please credit me as Jane Doe.")
    assert "Bob" not in credit_words.own_words(reply)
    assert text_work.read(reply).reply_credit.name == "Jane Doe"


# -- the regex work on the adversarial corpus, counted -----------------------------------------------


class _Counting:
    """Counts the characters every RE2 pattern is given (each search is linear in them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.characters = 0
        self.calls = 0
        for method in ("search", "match", "fullmatch", "finditer", "findall", "split", "sub"):
            monkeypatch.setattr(patterns.Pattern, method, self._counted(getattr(patterns.Pattern, method)))

    def _counted(self, method):  # type: ignore[no-untyped-def]
        def counted(pattern, *args, **kwargs):  # type: ignore[no-untyped-def]
            text = args[1] if method.__name__ == "sub" else args[0]
            self.characters += len(text)
            self.calls += 1
            return method(pattern, *args, **kwargs)
        return counted

    def work(self, raw: bytes, rules: quality.RuleSet) -> tuple[int, int]:
        self.characters = self.calls = 0
        mail = parse.parse(raw)
        rules.score(mail)
        text_work.read(mail.body_text)
        return self.characters, self.calls


SMALL, LARGE = 8_000, 32_000  # four times the flood: linear work is about four times the work


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", adversarial.CASES)
def test_regex_work_grows_linearly_with_each_flood(monkeypatch, case):
    rules = load_rules(SHIPPED_RULES)
    counting = _Counting(monkeypatch)
    small, large = (adversarial.build(case, size) for size in (SMALL, LARGE))
    (small_chars, small_calls), (large_chars, large_calls) = counting.work(small, rules), counting.work(large, rules)
    ratio = len(large) / len(small)
    # Fixed costs (headers, the subject, each rule's pattern on an empty text) allow a margin.
    assert large_chars <= ratio * 1.2 * small_chars + 10_000, (small_chars, large_chars)
    assert large_calls <= ratio * 1.2 * small_calls + 200, (small_calls, large_calls)
    # And in all, a bounded number of passes over the message.
    assert large_chars <= 60 * len(large) + 50_000


# -- no text work under the write lock ------------------------------------------------------------


def test_no_text_work_runs_while_the_write_lock_is_held(make_settings, start_intake_listener, monkeypatch):
    """The act stage copies what the prepare stage read: credit recognition, quote trimming,
    command splitting and scoring all fail here if called inside a write transaction."""
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(message_id="<report@researcher.test>"))
    assert process(settings, running.engine).tickets_opened

    locked = []
    real_write_session = processor.write_session

    @contextmanager
    def watched_write_session(engine):  # type: ignore[no-untyped-def]
        with real_write_session(engine) as session:
            locked.append(True)
            try:
                yield session
            finally:
                locked.pop()

    def forbidden_under_lock(function):  # type: ignore[no-untyped-def]
        def guarded(*args, **kwargs):  # type: ignore[no-untyped-def]
            assert not locked, f"{function.__name__} ran under the write lock"
            return function(*args, **kwargs)
        return guarded

    monkeypatch.setattr(processor, "write_session", watched_write_session)
    for module, name in [(credit_words, "recognise"), (credit_words, "own_words"), (text_work, "split_commands"),
                         (text_work, "trim_reply"), (text_work, "read"), (parse, "parse")]:
        monkeypatch.setattr(module, name, forbidden_under_lock(getattr(module, name)))
    monkeypatch.setattr(quality.RuleSet, "score", forbidden_under_lock(quality.RuleSet.score))

    # The attack of finding 1, threaded into the ticket as the reporter's reply.
    flood = report(subject="Re: XSS in the login form", message_id="<reply@researcher.test>",
                   body="Please credit me as Jane Doe.\n" + "\n" * 60_000 + "On Mon, security wrote:\n> quoted\n",
                   In_Reply_To="<report@researcher.test>")
    smtp_send(running.port, flood)
    result = process(settings, running.engine, datetime.now(timezone.utc))

    assert result.decisions == {REPORTER_REPLY: 1} and not result.failed
    [ticket] = all_tickets(running.engine)
    assert ticket.credit["name"] == "Jane Doe" and ticket.credit["source"] == "reply"


def test_text_work_reads_credit_commands_and_the_relayed_text():
    work = text_work.read(
        "#severity high\n\n#note\nFixed in 1.2; credit me as Ana.\n-- \nAna\nOn Mon, Bob wrote:\n> credit me as Bob\n")
    assert work.commands == (("severity", "high"), ("note", "")) and work.internal and not work.more_commands
    assert work.relayed_text == "Fixed in 1.2; credit me as Ana."
    assert work.report_credit.name == "Ana" and work.reply_credit.source == "reply"
    flood = text_work.read("#label x\n" * 10_000 + "Hello\n")
    assert len(flood.commands) == text_work.MAX_COMMANDS
    assert flood.more_commands == 10_000 - text_work.MAX_COMMANDS and flood.relayed_text == "Hello"


def test_an_unusable_rules_pattern_is_named_with_the_reason():
    with pytest.raises(RulesError, match=r"pattern 1 '\(a\)\\\\1'.*RE2"):
        parse_rules('threshold = 1.0\n[[rule]]\nname = "x"\ndescription = "x"\nscore = 1.0\nbody = [\'(a)\\1\']\n')


@pytest.mark.parametrize("case", ["open-tags", "entities", "deep-html"])
def test_html_conversion_handles_a_bounded_number_of_events(monkeypatch, case):
    """html2text costs per tag, lone '<' and character reference: past MAX_HTML_EVENTS the HTML is cut."""
    import html2text
    monkeypatch.setattr(body_text, "MAX_HTML_EVENTS", 1_000)
    events = []
    for method in ("handle_data", "handle_tag", "handle_entityref", "handle_charref"):
        real = getattr(html2text.HTML2Text, method)
        monkeypatch.setattr(html2text.HTML2Text, method,
                            lambda self, *args, _real=real, **kwargs: events.append(1) or _real(self, *args, **kwargs))
    mail = parse.parse(adversarial.build(case, 200_000))
    assert len(events) <= 3 * 1_000
    assert any(warning.startswith("limit MAX_HTML_EVENTS (1000)") for warning in mail.warnings)
