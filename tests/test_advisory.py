"""`intake advisory REF --format osv`: a draft that validates against the OSV JSON schema
(tests/data/osv-schema.json, vendored from ossf/osv-schema)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
from sqlalchemy import update

from conftest import process, report, smtp_send
from intake.store.db import write_session
from intake.store.models import Ticket
from intake.tickets import reads

SCHEMA = json.loads((Path(__file__).parent / "data" / "osv-schema.json").read_text())
VECTOR = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"


def validate(draft: dict) -> None:
    jsonschema.validate(draft, SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.fixture
def ticket(make_settings, start_intake_listener):
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report(subject="SQL injection in the search API",
                                   body="Steps: ...\nPlease credit me as Jane Doe (https://jane.example)\n"))
    [reference] = process(settings, running.engine).tickets_opened
    return running.engine, reference


def test_a_new_ticket_drafts_a_valid_advisory(cli, ticket):
    _, reference = ticket
    draft = json.loads(cli("advisory", reference, "--format", "osv").stdout)
    validate(draft)
    assert draft["id"] == reference and draft["summary"] == "SQL injection in the search API"
    assert draft["credits"] == [{"name": "Jane Doe", "type": "FINDER", "contact": ["https://jane.example"]}]
    assert "published" not in draft  # nothing is public yet
    assert draft["database_specific"]["intake_reference"] == reference
    assert draft["affected"][0]["package"] == {"ecosystem": "TODO", "name": "TODO"}
    assert "severity" not in draft


def test_released_and_disclosed_with_cvss_fill_the_draft(cli, ticket, config_file, tmp_path):
    engine, reference = ticket
    received = reads.ticket_detail(engine, reference).ticket.received_at
    released_at, disclosed_at = received + timedelta(milliseconds=1), received + timedelta(milliseconds=2)
    cli("ack", reference, "--at", released_at.isoformat())
    cli("assess", reference, "--severity", "critical", "--at", released_at.isoformat())
    cli("released", reference, "--version", "2.0.1", "--at", released_at.isoformat())
    cli("disclose", reference, "--at", disclosed_at.isoformat())
    with write_session(engine) as session:  # the CVSS vector is set by `intake severity --cvss` (elsewhere)
        session.execute(update(Ticket).where(Ticket.reference == reference).values(cvss_vector=VECTOR))
    config_file.write_text(config_file.read_text().replace('id_prefix = ""', 'id_prefix = "EXAMPLE-"'))
    target = tmp_path / "advisory.json"
    cli("advisory", reference, "-o", str(target))
    draft = json.loads(target.read_text())
    validate(draft)
    assert draft["id"] == f"EXAMPLE-{reference}"
    assert draft["severity"] == [{"type": "CVSS_V3", "score": VECTOR}]
    assert draft["published"] == disclosed_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert draft["modified"] == draft["published"]
    assert draft["affected"][0]["ranges"][0]["events"] == [{"introduced": "TODO"}, {"fixed": "2.0.1"}]
    assert "Fixed in 2.0.1." in draft["details"]
    assert "exists" in cli("advisory", reference, "-o", str(target), code=1).output
    cli("advisory", reference, "-o", str(target), "--force")


def test_the_schema_check_can_fail(cli, ticket):
    _, reference = ticket
    draft = json.loads(cli("advisory", reference).stdout)
    del draft["modified"]
    with pytest.raises(jsonschema.ValidationError):
        validate(draft)
    draft = json.loads(cli("advisory", reference).stdout)
    draft["modified"] = "yesterday"
    with pytest.raises(jsonschema.ValidationError):
        validate(draft)


def test_anonymous_reporters_are_not_credited_and_unknown_tickets_fail(cli, ticket):
    _, reference = ticket
    cli("credit", reference, "--anonymous")
    draft = json.loads(cli("advisory", reference).stdout)
    validate(draft)
    assert "credits" not in draft
    assert "no ticket SEC-1999-0001" in cli("advisory", "SEC-1999-0001", code=1).output
