"""OpenPGP end to end with keys made here: reports encrypted to the organisation's key (PGP/MIME
and inline) sent over SMTP to the real listener are decrypted in `intake show` and `intake
attachment`, marked with their signature; the acknowledgement, replies and maintainers' notices
reach a real SMTP sink as PGP/MIME that the recipients' own keys decrypt; Debian's gpg reads what
we send and we read what it sends."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import subprocess
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pysequoia
import pytest
from sqlalchemy import select

from conftest import deliver_outbox, process, report, smtp_send
from intake.openpgp import OrgKey
from intake.send.pgp_mime import Encryption, encrypted
from intake.store.db import read_session
from intake.store.models import InboundRaw
from intake.understand.parse import parse
from intake.understand.parsed_mail import ParsedMail
from intake.understand.pgp_inbound import Decryption

MAINTAINERS = """
[[maintainers]]
name = "Ana Maintainer"
email = "ana@maintainers.test"
openpgp_key = "ana.asc"

[[maintainers]]
name = "Bo Triager"
email = "bo@maintainers.test"
"""

CANARY = "canary-7f3a-report-text"
POC = b"\x7fELF proof of concept \x00\x01\x02"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url


class Keys:
    """The organisation's, a reporter's and a maintainer's keys, made for this test."""

    def __init__(self, folder: Path):
        self.org = pysequoia.Tsk.generate("Security <security@example.com>")
        self.reporter = pysequoia.Tsk.generate("Alice Researcher <alice@researcher.test>")
        self.ana = pysequoia.Tsk.generate("Ana Maintainer <ana@maintainers.test>")
        self.org_file = folder / "org-key.asc"
        self.org_file.write_text(str(self.org))
        (folder / "ana.asc").write_text(str(self.ana.extract_certificate()))
        self.reporter_public = folder / "alice.asc"
        self.reporter_public.write_text(str(self.reporter.extract_certificate()))

    def org_public(self) -> pysequoia.Cert:
        return self.org.extract_certificate()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def desk(make_settings, start_intake_listener, config_file, sink, keys):  # type: ignore[no-untyped-def]
    """The real listener with OpenPGP on, relaying to the sink; maintainers Ana (with a key) and Bo."""
    config_file.write_text(config_file.read_text() + MAINTAINERS)

    def start(**env: str):  # type: ignore[no-untyped-def]
        settings = make_settings(INTAKE_OUTBOUND__TRANSPORT="smtp", INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{sink.port}",
                                 INTAKE_OPENPGP__KEY_FILE=str(keys.org_file), **env)
        return settings, start_intake_listener(settings)

    return start


def _delivered(settings, running, sink) -> dict[str, email.message.EmailMessage]:  # type: ignore[no-untyped-def]
    before = len(sink.messages)
    sent = deliver_outbox(settings, running.engine).get("sent", 0)
    return {mail.rcpt_tos[0]: email.message_from_bytes(mail.data, policy=email.policy.default)
            for mail in sink.wait_for(before + sent)[before:]}


def _pgp_mime(inner: bytes, keys: Keys, signed: bool = True, to: pysequoia.Cert | None = None) -> MIMEMultipart:
    """A PGP/MIME message (RFC 3156) from the reporter with *inner* encrypted to the organisation."""
    ciphertext = pysequoia.encrypt(inner, recipients=[to or keys.org_public()],
                                   signer=keys.reporter.signer() if signed else None)
    outer = MIMEMultipart("encrypted", protocol="application/pgp-encrypted")
    outer.attach(MIMEApplication(b"Version: 1\n", "pgp-encrypted", _encoder=lambda part: None))
    outer.attach(MIMEApplication(ciphertext, "octet-stream", _encoder=lambda part: None))
    outer["From"] = "Alice Researcher <alice@researcher.test>"
    outer["To"] = "security@example.com"
    outer["Subject"] = "Encrypted report"
    outer["Message-ID"] = "<encrypted-report@researcher.test>"
    return outer


def _report_entity(keys: Keys) -> bytes:
    """What the reporter encrypts: the text, a PoC and her public key (application/pgp-keys)."""
    inner = EmailMessage()
    inner.set_content(f"SQL injection in /search. {CANARY}\n")
    inner.add_attachment(POC, maintype="application", subtype="octet-stream", filename="poc.bin")
    inner.add_attachment(str(keys.reporter.extract_certificate()).encode(), maintype="application",
                         subtype="pgp-keys", filename="alice.asc")
    return inner.as_bytes()


def _decrypted(message: email.message.EmailMessage, secret: pysequoia.Tsk) -> str:
    """The text of a PGP/MIME mail we sent, decrypted with *secret*; its signature must verify
    against the organisation's key (checked by the caller through the store)."""
    assert message.get_content_type() == "multipart/encrypted"
    assert message.get_param("protocol") == "application/pgp-encrypted"
    control, encrypted = message.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted"
    ciphertext = encrypted.get_payload(decode=True)
    inner = pysequoia.decrypt(ciphertext, decryptor=secret.decryptor()).bytes
    return email.message_from_bytes(inner, policy=email.policy.default).get_body(("plain",)).get_content()


def _signed_by(message: email.message.EmailMessage, secret: pysequoia.Tsk, signer: pysequoia.Cert) -> bool:
    ciphertext = message.get_payload()[1].get_payload(decode=True)
    result = pysequoia.decrypt(ciphertext, decryptor=secret.decryptor(), store=lambda ids: [signer])
    return [s.certificate for s in result.valid_sigs] == [signer.fingerprint]


def test_pgp_mime_report_is_decrypted_kept_encrypted_and_answered_encrypted(desk, keys, sink, cli, tmp_path):
    settings, running = desk()
    smtp_send(running.port, _pgp_mime(_report_entity(keys), keys))
    [reference] = process(settings, running.engine).tickets_opened

    shown = cli("show", reference).output
    assert CANARY in shown
    fingerprint = keys.reporter.extract_certificate().fingerprint.upper()
    assert "received encrypted (pgp-mime), decrypted" in shown
    assert f"signed by {fingerprint}, verified against the key attached to the report" in shown
    cli("attachment", reference, "1", "-o", str(tmp_path / "poc.out"))
    assert (tmp_path / "poc.out").read_bytes() == POC
    with read_session(running.engine) as session:  # the ciphertext is what stays stored
        [raw] = session.scalars(select(InboundRaw.raw))
    assert b"-----BEGIN PGP MESSAGE-----" in raw and CANARY.encode() not in raw
    assert fingerprint in cli("key", reference).output

    mails = _delivered(settings, running, sink)
    ack = mails["alice@researcher.test"]
    assert CANARY not in ack.as_string() and "auto-replied" == ack["Auto-Submitted"]
    assert reference in ack["Subject"] and reference in _decrypted(ack, keys.reporter)
    assert _signed_by(ack, keys.reporter, keys.org_public())
    with pytest.raises(RuntimeError):  # encrypted to her (and us), not to anyone else
        _decrypted(ack, keys.ana)
    assert CANARY in _decrypted(mails["ana@maintainers.test"], keys.ana)
    assert mails["bo@maintainers.test"].get_content_type() == "text/plain"  # Bo has no key

    cli("reply", reference, "-m", f"Thanks, confirmed {reference}.")
    [reply] = _delivered(settings, running, sink).values()
    assert f"confirmed {reference}" in _decrypted(reply, keys.reporter)


def test_inline_report_signed_by_a_key_given_later_verifies_against_it(desk, keys, sink, cli):
    settings, running = desk()
    block = pysequoia.encrypt(f"Inline report {CANARY}".encode(), recipients=[keys.org_public()],
                              signer=keys.reporter.signer()).decode()
    smtp_send(running.port, report(subject="Inline encrypted", body=f"Hello,\n\n{block}\n-- Alice\n"))
    [reference] = process(settings, running.engine).tickets_opened
    shown = cli("show", reference).output
    assert f"Inline report {CANARY}" in shown and "-- Alice" in shown
    assert "received encrypted (inline-pgp), decrypted" in shown and "NOT verified" in shown
    ack = _delivered(settings, running, sink)["alice@researcher.test"]
    assert ack.get_content_type() == "text/plain"  # no key of hers yet: the acknowledgement goes in clear

    cli("key", reference, str(keys.reporter_public))
    again = pysequoia.encrypt(b"One more detail", recipients=[keys.org_public()], signer=keys.reporter.signer())
    smtp_send(running.port, report(subject=f"Re: [{reference}] Inline encrypted", body=again.decode()))
    process(settings, running.engine)
    fingerprint = keys.reporter.extract_certificate().fingerprint.upper()
    assert f"signed by {fingerprint}, verified against the known reporter key" in cli("show", reference).output
    forwards = _delivered(settings, running, sink)  # her reply, forwarded to each maintainer
    assert "One more detail" in _decrypted(forwards["ana@maintainers.test"], keys.ana)
    assert "One more detail" in forwards["bo@maintainers.test"].get_content()

    cli("reply", reference, "-m", "Fixed in 2.1.")
    reply = _delivered(settings, running, sink)["alice@researcher.test"]
    assert "Fixed in 2.1." in _decrypted(reply, keys.reporter)


def test_a_report_that_cannot_be_decrypted_still_makes_a_ticket_saying_so(desk, keys, cli):
    settings, running = desk()
    stranger = pysequoia.Tsk.generate("Someone else <else@example.org>").extract_certificate()
    smtp_send(running.port, _pgp_mime(b"Content-Type: text/plain\r\n\r\nnot for you\r\n", keys, to=stranger))
    damaged = report(subject="Damaged", body="-----BEGIN PGP MESSAGE-----\n\nbm90IGFybW9y\n-----END PGP MESSAGE-----\n")
    smtp_send(running.port, damaged)
    opened = process(settings, running.engine).tickets_opened
    assert len(opened) == 2
    first, second = (cli("show", reference).output for reference in opened)
    assert "not decrypted" in first and "encrypted report not decrypted" in first and "BEGIN PGP MESSAGE" in first
    assert "inline PGP block not decrypted" in second


def test_notices_without_the_report_text(desk, keys, sink):
    settings, running = desk(INTAKE_SCHEDULER__NOTICES_INCLUDE_REPORT="false")
    smtp_send(running.port, report(subject="Plain report", body=f"Details: {CANARY}\n"))
    [reference] = process(settings, running.engine).tickets_opened
    mails = _delivered(settings, running, sink)
    bo = mails["bo@maintainers.test"]
    assert bo.get_content_type() == "text/plain" and reference in bo.get_content()
    assert CANARY not in bo.get_content() and "notices_include_report = false" in bo.get_content()
    ana = _decrypted(mails["ana@maintainers.test"], keys.ana)
    assert reference in ana and CANARY not in ana


def test_security_txt_names_the_key_and_key_export_prints_it(desk, keys, cli, monkeypatch):
    desk(INTAKE_SECURITY_TXT__EXPIRES="2099-01-01T00:00:00Z")
    fingerprint = keys.org_public().fingerprint
    assert f"Encryption: openpgp4fpr:{fingerprint}\n" in cli("security-txt").output
    monkeypatch.setenv("INTAKE_OPENPGP__KEY_URL", "https://example.com/security.asc")
    assert "Encryption: https://example.com/security.asc\n" in cli("security-txt").output
    exported = cli("key", "export").output
    assert "PRIVATE KEY" not in exported
    cert = pysequoia.Cert.from_bytes(exported.encode())
    assert cert.fingerprint == fingerprint and not cert.has_secret_keys


GPG = shutil.which("gpg")


@pytest.mark.skipif(GPG is None, reason="Debian's gnupg is not installed")
def test_gpg_encrypts_what_we_read_and_reads_what_we_send(keys, tmp_path):
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str, data: bytes = b"") -> bytes:
        return subprocess.run([GPG, "--batch", "--yes", "--quiet", "--pinentry-mode", "loopback", "--passphrase", "",
                               *args], input=data, env=env, capture_output=True, check=True, timeout=60).stdout

    gpg("--import", data=str(keys.org_public()).encode())
    gpg("--import", data=str(keys.reporter).encode())  # gpg plays the reporter
    reporter = keys.reporter.extract_certificate().fingerprint
    decryption = Decryption(OrgKey(bytes(keys.org)), 10 ** 6)

    def inline_from_gpg(*options: str) -> ParsedMail:
        ciphertext = gpg("--encrypt", "--sign", "--armor", "--trust-model", "always", *options, "--local-user",
                         reporter, "--recipient", keys.org_public().fingerprint, data=f"From gpg: {CANARY}\n".encode())
        inline = report(body=f"Report:\n{ciphertext.decode()}")
        inline.add_attachment(str(keys.reporter.extract_certificate()).encode(), maintype="application",
                              subtype="pgp-keys", filename="alice.asc")
        return parse(inline.as_bytes(), decryption)

    uncompressed = inline_from_gpg("--compress-algo", "none")
    assert f"From gpg: {CANARY}" in uncompressed.body_text
    assert uncompressed.pgp.verified and uncompressed.pgp.signer == reporter.upper()
    # gpg's default compresses inside the encryption: read, its signature named but not checked.
    compressed = inline_from_gpg()
    assert f"From gpg: {CANARY}" in compressed.body_text
    assert compressed.pgp.signed and not compressed.pgp.verified
    assert any(w.startswith("signature not checked") for w in compressed.warnings)

    # A reporter whose key gpg made (no SEIPDv2 in its features: we must send what gpg 2.2 reads).
    gpg("--quick-generate-key", "Bob Gpg <bob@researcher.test>", "ed25519", "sign", "never")
    bob = gpg("--list-keys", "--with-colons", "bob@researcher.test").decode()
    fingerprint = next(line.split(":")[9] for line in bob.splitlines() if line.startswith("fpr"))
    gpg("--quick-add-key", fingerprint, "cv25519", "encr", "never")
    bob_public = gpg("--export", "--armor", "bob@researcher.test").decode()
    sent = encrypted(b"Content-Type: text/plain\r\nFrom: a@example.com\r\nSubject: x\r\n\r\nFor gpg\r\n",
                     Encryption((bob_public,), OrgKey(bytes(keys.org))))
    message = email.message_from_bytes(sent, policy=email.policy.default)
    plain = gpg("--decrypt", data=message.get_payload()[1].get_payload(decode=True))
    assert plain.endswith(b"\r\n\r\nFor gpg\r\n") and plain.startswith(b"Content-Type: text/plain")


@pytest.mark.skipif(GPG is None, reason="Debian's gnupg is not installed")
def test_a_protected_key_from_credentials_needs_its_passphrase(make_settings, cli, tmp_path, monkeypatch):
    home, credentials = tmp_path / "gnupg", tmp_path / "credentials"
    home.mkdir(mode=0o700)
    credentials.mkdir()
    env = {**os.environ, "GNUPGHOME": str(home)}

    def gpg(*args: str) -> bytes:
        return subprocess.run([GPG, "--batch", "--yes", "--quiet", "--pinentry-mode", "loopback", "--passphrase",
                               "correct horse", *args], env=env, capture_output=True, check=True, timeout=60).stdout

    gpg("--quick-generate-key", "Security <security@example.com>", "ed25519", "sign", "never")
    listing = gpg("--list-keys", "--with-colons").decode()
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))
    gpg("--quick-add-key", fingerprint, "cv25519", "encr", "never")
    (credentials / "openpgp-key").write_bytes(gpg("--export-secret-keys", "--armor"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    make_settings()
    assert "needs its passphrase" in cli("check-config", code=78).output
    (credentials / "openpgp-passphrase").write_text("correct horse\n")
    assert f"OpenPGP key {fingerprint}" in cli("check-config").output
    (tmp_path / "not-a-key").write_text("hello")
    monkeypatch.setenv("INTAKE_OPENPGP__KEY_FILE", str(tmp_path / "not-a-key"))
    assert "not a usable secret key" in cli("check-config", code=78).output


def test_decryption_is_bounded_and_keys_are_read_from_any_report(keys):
    small = Decryption(OrgKey(bytes(keys.org)), 1024)
    big = _pgp_mime(_report_entity(keys), keys)  # over 1 KB of ciphertext: the PoC and a key inside
    mail = parse(big.as_bytes(), small)
    assert mail.pgp is None and "over openpgp.max_ciphertext (1024)" in " ".join(mail.warnings)
    assert CANARY not in mail.body_text and "BEGIN PGP MESSAGE" in mail.body_text
    # A key sent in clear is read without any organisation key configured (for later mail).
    clear = report(body=f"My key:\n{keys.reporter.extract_certificate()}")
    [armored] = parse(clear.as_bytes()).public_keys
    assert pysequoia.Cert.from_bytes(armored.encode()).fingerprint == keys.reporter.extract_certificate().fingerprint


def _signed_then_encrypted(keys: Keys, text: str, altered: str | None = None) -> MIMEMultipart:
    """RFC 3156 section 6.1 (as mutt sends): a multipart/signed entity, then encrypted; *altered*
    replaces the text after signing."""
    body = MIMEMultipart("mixed")
    body.attach(MIMEText(text))
    key = MIMEApplication(str(keys.reporter.extract_certificate()).encode(), "pgp-keys", _encoder=lambda part: None)
    key.add_header("Content-Disposition", "attachment", filename="alice.asc")
    body.attach(key)
    signature = pysequoia.sign(keys.reporter.signer(), body.as_bytes().replace(b"\n", b"\r\n"),
                               mode=pysequoia.SignatureMode.DETACHED)
    signed = MIMEMultipart("signed", protocol="application/pgp-signature", micalg="pgp-sha256")
    signed.attach(body)
    signed.attach(MIMEApplication(signature, "pgp-signature", _encoder=lambda part: None))
    entity = signed.as_bytes().replace(b"\n", b"\r\n")
    changed = entity.replace(text.strip().encode(), altered.strip().encode()) if altered else entity
    return _pgp_mime(changed, keys, signed=False)


def test_a_signed_entity_encrypted_is_verified_and_an_altered_one_is_not(keys):
    decryption = Decryption(OrgKey(bytes(keys.org)), 10 ** 6)
    fingerprint = keys.reporter.extract_certificate().fingerprint.upper()
    good = parse(_signed_then_encrypted(keys, f"Signed, then encrypted: {CANARY}\n").as_bytes(), decryption)
    assert CANARY in good.body_text and good.pgp.signed and good.pgp.verified and good.pgp.signer == fingerprint
    altered = parse(_signed_then_encrypted(keys, f"Signed, then encrypted: {CANARY}\n",
                                           f"Signed, then altered: {CANARY}\n").as_bytes(), decryption)
    assert "altered" in altered.body_text and altered.pgp.signed and not altered.pgp.verified
