"""`intake security-txt` (RFC 9116) from the [security_txt] config, and check-config's expiry warning."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

SECTION = """
[security_txt]
extra_contacts = ["https://example.com/report", "tel:+1-201-555-0123"]
expires = "{expires}"
encryption = ["https://example.com/pgp-key.txt", "openpgp4fpr:5f2de5521c63a801ab59ccb603d49de44b29100f"]
policy = "https://example.com/security-policy"
acknowledgments = "https://example.com/hall-of-fame"
preferred_languages = ["en", "de"]
canonical = ["https://example.com/.well-known/security.txt"]
hiring = "https://example.com/jobs"
"""


def _in(days: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=days)).replace(microsecond=0).isoformat()


@pytest.fixture
def configure(config_file, monkeypatch):
    """Replace the shipped [security_txt] section; no INTAKE_* variable from the environment leaks in."""
    for name in [n for n in os.environ if n.startswith("INTAKE_")]:
        monkeypatch.delenv(name)
    shipped = config_file.read_text()
    head, _, tail = shipped.partition("[security_txt]")
    rest = tail[tail.index("\n[advisory]"):]

    def write(section: str) -> None:
        config_file.write_text(head + section + rest)

    return write


def test_the_file_has_every_field_in_order(cli, configure):
    configure(SECTION.format(expires="2099-01-31T00:00:00+10:00"))
    out = cli("security-txt").stdout
    assert "\r" not in out and out.endswith("\n")
    assert out.splitlines() == [
        "Contact: mailto:security@example.com",
        "Contact: https://example.com/report",
        "Contact: tel:+1-201-555-0123",
        "Expires: 2099-01-30T14:00:00Z",
        "Encryption: https://example.com/pgp-key.txt",
        "Encryption: openpgp4fpr:5f2de5521c63a801ab59ccb603d49de44b29100f",
        "Policy: https://example.com/security-policy",
        "Acknowledgments: https://example.com/hall-of-fame",
        "Preferred-Languages: en, de",
        "Canonical: https://example.com/.well-known/security.txt",
        "Hiring: https://example.com/jobs",
    ]


def test_minimal_file_and_env_override(cli, configure, monkeypatch):
    configure('[security_txt]\nexpires = "2099-01-01T00:00:00Z"\n')
    monkeypatch.setenv("INTAKE_SMTP__ADDRESSES", '["security@example.org", "psirt@example.org"]')
    monkeypatch.setenv("INTAKE_SECURITY_TXT__EXPIRES", "2098-06-01T12:00:00Z")
    assert cli("security-txt").stdout.splitlines() == [
        "Contact: mailto:security@example.org", "Contact: mailto:psirt@example.org", "Expires: 2098-06-01T12:00:00Z"]


def test_expires_is_required_for_the_file(cli, configure):
    configure("[security_txt]\n")
    assert "security_txt.expires is not set" in cli("security-txt", code=78).output


@pytest.mark.parametrize(("line", "message"), [
    ('expires = "2027-01-31"', "not an RFC 3339 date and time"),
    ('expires = "2027-01-31T00:00:00"', "not an RFC 3339 date and time"),
    ('expires = "2027-02-30T00:00:00Z"', "security_txt.expires"),
    ('policy = "http://example.com/policy"', "https"),
    ('canonical = ["https://"]', "not an https:// URL"),
    ('extra_contacts = ["security@example.com"]', "mailto: or tel: or https:"),
    ('acknowledgments = "https://example.com/a b"', "without spaces"),
    ('preferred_languages = ["en_US"]', "not a language tag"),
    ('signature = "x"', "unknown key"),
])
def test_bad_values_are_configuration_errors(cli, configure, line, message):
    configure(f"[security_txt]\n{line}\n")
    assert message in cli("check-config", code=78).output


@pytest.mark.parametrize(("days", "warning"), [
    (200, None),
    (10, "is 10 day(s) away (less than 30)"),
    (-1, "has passed"),
    (400, "more than a year away"),
])
def test_check_config_warns_about_expiry(cli, configure, days, warning):
    configure(f'[security_txt]\nexpires = "{_in(days)}"\n')
    result = cli("check-config")
    assert "OK" in result.stdout
    if warning is None:
        assert result.stderr == ""
    else:
        assert warning in result.stderr and "warning" in result.stderr
