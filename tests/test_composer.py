"""intake.send.composer: the bytes of composed mail."""

from __future__ import annotations

import email
import email.policy
import re
import string
from datetime import datetime, timezone
from email.mime.text import MIMEText

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from intake.send import composer
from intake.understand.header_text import clean_text
from intake.vocabulary import LOOP_HEADER, TICKET_HEADER, MailKind

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
_STDLIB = email.policy.compat32.clone(linesep="\r\n")


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["Subject", "To", "Message-ID", "References", "X-Intake-Ticket"]),
       value=st.text(alphabet=string.printable + "é✓", max_size=120))
def test_header_lines_are_the_bytes_the_stdlib_writes(name, value):
    """The fast path for short ASCII headers changes the cost of composing, never the bytes."""
    if "\r" in value or "\n" in value:
        return  # text_bytes refuses line breaks in headers before they get here
    message = MIMEText("body\n", "plain", "us-ascii")
    message[name] = value
    assert _outcome(message, composer._COMPAT32_CRLF) == _outcome(message, _STDLIB)


_WORD = st.text(alphabet=string.ascii_letters + string.digits + "[]:-.!?'()<>@/,;", min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["Subject", "X-Intake-Ticket"]),
       words=st.lists(_WORD | st.text(alphabet="xyz", min_size=60, max_size=90), min_size=2, max_size=30))
def test_a_long_plain_subject_folds_to_the_bytes_the_stdlib_writes(name, words):
    """Long subjects of words between single spaces (an acknowledgement's "Re: [SEC-…] …") are
    folded without ``Header.encode`` (words longer than a line, commas and semicolons still go to
    the stdlib): the same bytes."""
    message = MIMEText("body\n", "plain", "us-ascii")
    message[name] = " ".join(words)
    assert _outcome(message, composer._COMPAT32_CRLF) == _outcome(message, _STDLIB)


def _outcome(message: MIMEText, policy: email.policy.Policy) -> bytes | str:
    """The bytes, or the kind of error (the stdlib refuses values that would start a new header)."""
    try:
        return message.as_bytes(policy=policy)
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        return type(exc).__name__


_HEADER_NAMES = st.sampled_from(["To", "Subject", "Date", "Message-ID", "In-Reply-To", "References", "Reply-To",
                                 "Auto-Submitted", "X-Intake-Ticket"])
_HEADER_VALUES = st.text(alphabet=string.printable.replace("\r", "").replace("\n", "") + "é✓€", max_size=200)


_IDS = st.lists(st.text(alphabet=string.ascii_letters + "@.<>", min_size=1, max_size=40), max_size=4).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(sender_name=st.text(alphabet=string.printable + "é", max_size=60),
       headers=st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES)
                        | st.tuples(st.sampled_from(["In-Reply-To", "References"]), _IDS), max_size=12),
       body=st.text(alphabet=string.printable + "\r", max_size=3000))
def test_an_ascii_text_mail_is_the_bytes_mimetext_writes(sender_name, headers, body):
    """text_bytes writes ASCII text mail itself: the bytes must be the stdlib's, header for header
    (the header values once bounded: that step decides what is written, the writer how)."""
    from email.utils import formataddr

    assume(all(value.isascii() for name, value in headers if name == "To"))  # else: the SMTPUTF8 path
    try:
        composed: bytes | str = composer.text_bytes((sender_name, "security@example.com"), headers, body)
    except Exception as exc:  # noqa: BLE001 - compared, not hidden
        composed = type(exc).__name__
    stdlib = MIMEText(body, "plain", "us-ascii")
    stdlib["From"] = formataddr((sender_name, "security@example.com"), charset="utf-8")
    for name, value in composer._compat32_fields(composer.bounded_headers(headers)):
        stdlib[name] = value
    assert composed == _outcome(stdlib, _STDLIB)


# -- every line within RFC 5322's 998 octets -------------------------------------------------------

_WORDS = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " éü✓€😀", max_size=40),
    # unbroken runs up to 5,000 characters, ASCII or not
    st.builds(lambda char, count: char * count, st.sampled_from("aZ9-é✓😀"), st.integers(0, 5000)),
)
_TEXT = st.lists(_WORDS, max_size=4).map(" ".join)
_MESSAGE_ID = st.one_of(
    st.builds(lambda n: f"<{'m' * n}@researcher.test>", st.integers(0, 1200)),
    st.builds(lambda n: f"<{'c' * n}", st.integers(0, 600)),  # stored cut short: no closing '>'
    st.text(alphabet=string.ascii_letters + "<>@. é", max_size=60),
)
_COMPLETE_ID = re.compile(r"<[^<>\s]+>")


def _lines_fit(raw: bytes) -> None:
    lines = raw.split(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare line feed"
    longest = max(len(line) + 2 for line in lines)
    assert longest <= 998, f"a line of {longest} octets (CRLF included)"


def _threading_ids(message) -> list[str]:  # type: ignore[no-untyped-def]
    words = " ".join(str(message[name] or "") for name in ("In-Reply-To", "References")).split()
    assert all(_COMPLETE_ID.fullmatch(word) for word in words), words
    return words


@settings(max_examples=150, deadline=None)
@given(subject=_TEXT, name=_TEXT, in_reply_to=_MESSAGE_ID, references=st.lists(_MESSAGE_ID, max_size=4),
       address=st.sampled_from(["alice@researcher.test", "ålice@researcher.test"]))
def test_an_acknowledgement_of_any_report_has_no_line_over_998_octets(subject, name, in_reply_to, references, address):
    """A subject or sender name of 5,000 unbroken characters made acknowledgement lines of over a
    thousand octets, refused by relays ("500 Line too long"), and a stored Message-ID cut at 500
    characters left an unterminated '<…' in References."""
    mail = composer.automatic_reply(
        template="acknowledgement.txt.j2", kind="acknowledgement", reference="SEC-2026-0001", subject=subject,
        reporter_address=address, reporter_name=name, intake_address="security@example.com",
        from_name="Security Team", in_reply_to=in_reply_to, references=references, deadlines=[], policy="vaixus",
        message_id_domain="example.com", templates_dir=None, now=NOW)
    _lines_fit(mail.raw)
    parsed = email.message_from_bytes(mail.raw, policy=email.policy.default)
    shown = composer.shorten(composer.strip_reply_prefixes(clean_text(subject))) or "(no subject)"
    assert parsed["Subject"] == f"Re: [SEC-2026-0001] {shown}"
    assert len(shown) <= composer.MAX_SUBJECT
    ids = _threading_ids(parsed)
    assert all(len(i) <= composer.MAX_MESSAGE_ID for i in ids)
    assert set(ids) == ({i for i in [*references, in_reply_to] if i in composer.reusable_message_ids(i)}
                        if in_reply_to else set())
    assert parsed["Message-ID"] == mail.message_id
    assert f'your report "{shown}"' in " ".join(parsed.get_content().split("\n"))


@settings(max_examples=150, deadline=None)
@given(subject=_TEXT, body=st.lists(_TEXT, max_size=4).map("\n".join), references=st.lists(_MESSAGE_ID, max_size=4),
       to=st.sampled_from(["maintainer@example.com", "mäintainer@example.com"]), attach=st.booleans(),
       html=st.booleans())
def test_any_composed_mail_has_no_line_over_998_octets_and_reads_back_the_same(subject, body, references, to, attach,
                                                                              html):
    """Every way of composing (compat32 ASCII fast path, its quoted-printable and encoded-word
    fallbacks, the modern policy for SMTPUTF8 and attachments, multipart/alternative)."""
    subject = clean_text(subject, 10_000)
    headers = [("To", to), ("Subject", subject), ("Date", "Mon, 02 Mar 2026 09:00:00 +0000"),
               ("Message-ID", "<fwd.SEC-2026-0001.1@example.com>"), ("References", " ".join(references)),
               ("X-Intake-Ticket", "SEC-2026-0001")]
    sender = ("Security Team (SEC-2026-0001)", "security@example.com")
    if html:
        raw = composer.alternative_bytes(sender, headers, body, f"<p>{body}</p>")
    else:
        attachments = (composer.Attachment("poc.txt", "text/plain", body.encode()),) if attach else ()
        raw = composer.text_bytes(sender, headers, body, attachments)
    _lines_fit(raw)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == composer.shorten(subject, 300)
    assert _threading_ids(parsed) == [i for r in references for i in composer.reusable_message_ids(r)]
    text = parsed.get_body(("plain",)).get_content()
    assert text.replace("\r\n", "\n").rstrip("\n") == body.replace("\r\n", "\n").rstrip("\n")


def test_a_stored_message_id_cut_short_is_left_out_whole_not_written_unterminated():
    cut = "<" + "c" * 499  # parse keeps 500 characters of a Message-ID
    headers = [("To", "alice@researcher.test"), ("Subject", "Re: [SEC-2026-0001] x"), ("In-Reply-To", cut),
               ("References", f"<first@researcher.test> {cut}")]
    parsed = email.message_from_bytes(composer.text_bytes(("Security Team", "security@example.com"), headers, "hi\n"),
                                      policy=email.policy.default)
    assert parsed["In-Reply-To"] is None
    assert parsed["References"] == "<first@researcher.test>"


# -- compose: the one way every mail is built -----------------------------------------------------


def _composed(**overrides):  # type: ignore[no-untyped-def]
    fields = dict(sender=("Security Team", "security@example.com"), to=["alice@researcher.test"],
                  subject="Re: [SEC-2026-0001] RCE", text="Hello.\n", ticket="SEC-2026-0001",
                  message_id_domain="intake.example.com", now=NOW)
    mail = composer.compose(MailKind.CORRESPONDENCE, **{**fields, **overrides})
    return mail, email.message_from_bytes(mail.raw, policy=email.policy.default)


@given(automatic=st.sampled_from([None, composer.AUTO_REPLIED, composer.AUTO_GENERATED]),
       ticket=st.sampled_from([None, "SEC-2026-0001"]), threaded=st.booleans())
@settings(max_examples=30, deadline=None)
def test_every_mail_carries_the_loop_safety_and_threading_headers_its_kind_needs(automatic, ticket, threaded):
    mail, parsed = _composed(automatic=automatic, ticket=ticket,
                             in_reply_to="<b@researcher.test>" if threaded else None,
                             references=["<a@researcher.test>"])
    assert parsed[LOOP_HEADER] == "intake.example.com"  # every mail: ours coming back is a loop
    assert parsed[TICKET_HEADER] == ticket
    assert parsed["Message-ID"] == mail.message_id and mail.message_id.endswith("@intake.example.com>")
    assert parsed["Date"] == "Mon, 02 Mar 2026 09:00:00 +0000"
    assert (parsed["Auto-Submitted"], parsed["X-Auto-Response-Suppress"]) == (automatic, "All" if automatic else None)
    # Automatic mail goes from the null sender: nothing answers it, not even a bounce.
    assert mail.envelope_from == ("" if automatic else "security@example.com")
    assert (parsed["In-Reply-To"], parsed["References"]) == (
        ("<b@researcher.test>", "<a@researcher.test> <b@researcher.test>") if threaded else (None, None))


def test_a_subject_never_adds_a_header_and_every_mail_is_its_own_unless_deduplicated():
    mail, parsed = _composed(subject="Re: x\r\nBcc: mallory@evil.test\nX-Intake-Loop: forged")
    assert parsed["Bcc"] is None and parsed[LOOP_HEADER] == "intake.example.com"
    assert parsed["Subject"] == "Re: x Bcc: mallory@evil.test X-Intake-Loop: forged"
    assert _composed()[0].dedupe_key != mail.dedupe_key
    assert _composed(dedupe_key="ack:SEC-2026-0001")[0].dedupe_key == "ack:SEC-2026-0001"
    with pytest.raises(ValueError, match="line break"):
        _composed(to=["alice@researcher.test\r\nBcc: mallory@evil.test"])
