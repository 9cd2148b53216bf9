"""Every real-world sample in ../shared/corpus goes through the real listener and processor."""

from __future__ import annotations

import email
import email.policy
import re

import pytest
from sqlalchemy import select

from conftest import CORPUS, process, smtp_send
from intake.store.db import read_session
from intake.store.models import InboundMessage, ThreadEntry
from intake.understand.header_text import clean_text

SAMPLES = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.suffix in {".eml", ".txt", ""}
                 and not p.name.startswith(("LICENSE", "COPYING", "NOTICE", "README")))


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


def _stdlib_subject(raw: bytes) -> str | None:
    """The subject as Python's own parser decodes it, or None where that parser fails."""
    try:
        value = email.message_from_bytes(raw, policy=email.policy.default)["Subject"]
        return None if value is None else clean_text(str(value))
    except Exception:  # noqa: BLE001 - the stdlib has known crashes on some of these samples
        return None


@pytest.mark.skipif(not SAMPLES, reason=f"no corpus at {CORPUS}")
def test_every_corpus_message_gets_a_decision_and_no_failure(make_settings, start_intake_listener):
    assert len(SAMPLES) >= 150, f"corpus looks incomplete: {len(SAMPLES)} files"
    settings = make_settings(INTAKE_SMTP__MAX_MESSAGE_SIZE=str(50 * 1024 * 1024))
    running = start_intake_listener(settings)
    sent: dict[int, bytes] = {}
    for number, path in enumerate(SAMPLES):
        # As an MTA would hand it over: CRLF line endings.
        raw = re.sub(rb"\r?\n", b"\r\n", path.read_bytes())
        smtp_send(running.port, raw, mail_from=f"sample{number}@corpus.test")
        sent[number] = raw
    result = process(settings, running.engine)
    assert result.failed == []
    with read_session(running.engine) as session:
        stored = list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))
        subjects = {e.inbound_id: e.subject for e in session.scalars(select(ThreadEntry))
                    if e.inbound_id is not None}
    assert len(stored) == len(SAMPLES)
    undecided = [SAMPLES[n].name for n, m in enumerate(stored) if not m.decision]
    assert undecided == []
    mismatched = []
    for number, message in enumerate(stored):
        expected = _stdlib_subject(sent[number])
        if message.id in subjects and expected is not None and subjects[message.id] != expected:
            mismatched.append((SAMPLES[number].relative_to(CORPUS).as_posix(), subjects[message.id], expected))
    assert mismatched == []
