"""Encryption at rest (intake.store.sealing): a canary in a report and its attachment, sent through
the real service over SMTP, is in no byte of the database, its WAL, a backup or the log, and the CLI
still shows it; rotation, shredding, wrong keys, plaintext rows from before a key was set."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from conftest import all_tickets, deliver_outbox, process, report
from intake.cli.app import main
from intake.store.key_rotation import storage_keyring
from intake.store import inbound, inbound_lookups, key_rotation, sealing
from intake.store.db import make_engine, read_session, write_session
from intake.store.inbound import Arrival
from intake.store.models import DataKey, InboundMessage, InboundRaw, Outbox, ThreadEntry
from intake.tickets import attachments
from intake.tickets.reads import ticket_detail
from test_serve import serve, serve_env  # noqa: F401 - fixtures

INTAKE = Path(sys.executable).parent / "intake"
CANARY = "CANARY-7f3a9c1e-body"
ATTACHED = "CANARY-5d2b8e44-attachment"
NOTED = "CANARY-0c61f2aa-note"
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
# Tests about files on disk and subprocesses: SQLite alone (make_settings would also run them on PostgreSQL).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _canary_report(subject: str = "Overflow in the parser"):
    message = report(subject=subject, body=f"Steps to reproduce:\n{CANARY}\n")
    # 7bit, so the canary is in the raw message as it is (base64 would hide it from the search).
    message.add_attachment(f"payload {ATTACHED}\n", filename="poc.txt", cte="7bit")
    return message


def _keygen(path: Path) -> Path:
    result = CliRunner().invoke(main, ["storage", "keygen", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path


def _run(config: Path, *args: str, env: dict[str, str], code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(INTAKE), "--config", str(config), *args], capture_output=True, timeout=120, env=env)
    assert result.returncode == code, result.stderr.decode()
    return result


def _found_in(paths: list[Path], *needles: str) -> list[str]:
    """Which files (that exist) hold any of *needles*, in any byte."""
    return [f"{path.name}: {needle}" for path in paths if path.exists()
            for needle in needles if needle.encode() in path.read_bytes()]


def _database_files(url: str) -> list[Path]:
    database = Path(url.removeprefix("sqlite:///"))
    return [database, Path(f"{database}-wal"), Path(f"{database}-shm")]


# -- the whole path, as an operator runs it -------------------------------------------------


def test_canary_is_in_no_byte_of_database_wal_backup_or_log_and_the_cli_shows_it(
        serve, serve_env, sink, config_file, tmp_path):  # noqa: F811 - fixtures
    key = _keygen(tmp_path / "storage.key")
    assert key.stat().st_mode & 0o777 == 0o600
    serve_env["INTAKE_STORAGE__KEY_FILE"] = str(key)
    server = serve()
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.send_message(_canary_report())
    [ack] = sink.wait_for(1)  # the acknowledgement went out: the report is a ticket
    files = _database_files(serve_env["INTAKE_DATABASE__URL"])
    assert files[1].exists()  # the WAL is there while the service runs, and is searched
    assert _found_in(files, CANARY, ATTACHED) == []
    reference = _run(config_file, "tickets", "--json", env=serve_env).stdout.decode().split('"reference": "')[1][:13]
    _run(config_file, "note", reference, "-m", f"internal: {NOTED}", env=serve_env)
    _run(config_file, "reply", reference, "-m", f"Thanks, we reproduced {NOTED}", env=serve_env)
    assert server.stop() == 0
    assert NOTED in b"".join(m.data for m in sink.wait_for(2)).decode()  # the reply left in clear, over SMTP

    backup = tmp_path / "backup.db"
    _run(config_file, "backup", str(backup), env=serve_env)
    shown = _run(config_file, "show", reference, env=serve_env).stdout.decode()
    assert CANARY in shown and NOTED in shown
    _run(config_file, "attachment", reference, "1", "-o", str(tmp_path / "poc.txt"), env=serve_env)
    assert ATTACHED in (tmp_path / "poc.txt").read_text()

    assert _found_in(files + [backup, server.log], CANARY, ATTACHED, NOTED) == []
    # The test can fail: the same search finds the canary the moment content is stored in clear.
    assert _found_in([tmp_path / "poc.txt"], ATTACHED)
    assert "Traceback" not in server.log.read_text()


@SQLITE_ONLY
def test_without_a_key_the_canary_is_in_the_database_file(make_settings, sqlite_url):
    settings = make_settings()
    engine = sealing.attach(make_engine(sqlite_url), storage_keyring(settings))
    raw = _canary_report().as_bytes()
    inbound.store(engine, [Arrival("alice@researcher.test", ["security@example.com"], "127.0.0.1", "h", raw, NOW)])
    assert _found_in(_database_files(sqlite_url), CANARY)


# -- sealing, opening, shredding on both databases ------------------------------------------


def _sealed_engine(make_settings, url: str, key: Path):
    settings = make_settings(INTAKE_STORAGE__KEY_FILE=str(key))
    return settings, sealing.attach(make_engine(url), storage_keyring(settings))


def _ticket_from_canary(settings, engine, subject: str = "Overflow in the parser") -> str:
    raw = _canary_report(subject).as_bytes()
    inbound.store(engine, [Arrival("alice@researcher.test", ["security@example.com"], "127.0.0.1", "h", raw, NOW,
                                   trace="Received: from h ([127.0.0.1]) by intake\r\n")])
    process(settings, engine, NOW)
    return all_tickets(engine)[-1].reference


def test_content_is_sealed_in_every_column_and_opens_through_the_readers(make_settings, database_url, tmp_path):
    settings, engine = _sealed_engine(make_settings, database_url, _keygen(tmp_path / "k"))
    reference = _ticket_from_canary(settings, engine)
    with read_session(engine) as session:
        raws = list(session.scalars(select(InboundRaw.raw))) + list(session.scalars(select(Outbox.raw)))
        texts = [t for t in session.scalars(select(ThreadEntry.body_text)) if t]
        traces = list(session.scalars(select(InboundMessage.trace)))
    assert raws and texts and all(sealing.is_sealed(v) for v in raws + texts + traces)
    assert not any(CANARY.encode() in bytes(v) for v in raws) and not any(CANARY in t for t in texts)
    detail = ticket_detail(engine, reference)
    assert CANARY in detail.entries[0].body_text
    meta, data = attachments.read(engine, reference, 1)
    assert ATTACHED.encode() in data and meta.filename == "poc.txt"
    assert key_rotation.status(engine, storage_keyring(settings))["plaintext_rows"] == {
        "inbound_message.raw": 0, "inbound_message.trace": 0, "thread_entry.body_text": 0, "outbox.raw": 0}
    # The outbox sends the mail opened.
    deliver_outbox(settings, engine, NOW)
    sent = list((Path(settings.resolve_path(settings.outbound.maildir)) / "new").iterdir())
    assert sent and all(b"Message-ID" in p.read_bytes() for p in sent)


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "clear"])
def test_a_message_past_the_in_place_size_is_written_in_pieces_and_reads_back_whole(make_settings, database_url,
                                                                                    tmp_path, sealed):
    """On SQLite a large message goes into its row in pieces (sealed piece by piece), not bound
    whole; beside a small one in the same commit, each reads back byte for byte, each sealed in
    its row when a key is set (the canary in no byte of the files), in clear when not."""
    settings = make_settings(**({"INTAKE_STORAGE__KEY_FILE": str(_keygen(tmp_path / "k"))} if sealed else {}))
    engine = sealing.attach(make_engine(database_url), storage_keyring(settings))
    filler = os.urandom(inbound.IN_PLACE_BYTES * 3 // 4).hex().encode()  # 1.5 pieces: a last one part-filled
    large = _canary_report().as_bytes() + b"\r\n" + filler
    small = _canary_report("a small one").as_bytes()
    ids = inbound.store(engine, [Arrival("alice@researcher.test", ["security@example.com"], "127.0.0.1", "h", raw, NOW)
                                 for raw in (large, small)])
    assert [inbound.get(engine, id_).raw for id_ in ids] == [large, small]
    with read_session(engine) as session:
        stored = [bytes(session.get(InboundRaw, id_).raw) for id_ in ids]
    assert [sealing.is_sealed(value) for value in stored] == [sealed, sealed]
    assert [CANARY.encode() in value for value in stored] == [not sealed, not sealed]
    if sealed and database_url.startswith("sqlite"):
        assert _found_in(_database_files(database_url), CANARY) == []


def test_ciphertext_moved_to_another_row_or_column_does_not_open(make_settings, database_url, tmp_path):
    settings, engine = _sealed_engine(make_settings, database_url, _keygen(tmp_path / "k"))
    first = _ticket_from_canary(settings, engine, "first")
    second = _ticket_from_canary(settings, engine, "second")
    with write_session(engine) as session:
        entries = {e.ticket_id: e for e in session.scalars(select(ThreadEntry).where(ThreadEntry.kind == "report"))}
        [one, two] = sorted(entries)
        session.execute(update(ThreadEntry).where(ThreadEntry.id == entries[two].id)
                        .values(body_text=entries[one].body_text))
    assert CANARY in ticket_detail(engine, first).entries[0].body_text
    with pytest.raises(sealing.SealingError):
        # Sealed for another column: the associated data differs, the tag does not verify.
        with read_session(engine) as session:
            sealing.open_text(session, "inbound_message", "trace", entries[one].body_text)
    with pytest.raises(sealing.SealingError):
        with read_session(engine) as session:
            row = session.execute(select(InboundRaw.raw, InboundMessage.data_key)
                                  .join(InboundMessage, InboundMessage.id == InboundRaw.id).limit(1)).one()
            value = bytes(row.raw)
            assert CANARY.encode() in sealing.open_bytes(session, "inbound_message", "raw", value, row.data_key)
            tampered = value[:-1] + bytes([value[-1] ^ 1])
            sealing.open_bytes(session, "inbound_message", "raw", tampered, row.data_key)
    assert second


def test_shredding_a_ticket_makes_its_content_unreadable_and_leaves_others(make_settings, database_url, tmp_path):
    settings, engine = _sealed_engine(make_settings, database_url, _keygen(tmp_path / "k"))
    gone = _ticket_from_canary(settings, engine, "to be purged")
    kept = _ticket_from_canary(settings, engine, "to be kept")
    with write_session(engine) as session:
        ticket_id = session.scalar(select(InboundMessage.ticket_id).where(InboundMessage.id == 1))
        # Its key, its stored message's key (and no other).
        assert sealing.shred(session, ticket_ids=[ticket_id]) == 2
    assert ticket_detail(engine, gone).entries[0].body_text == "(content purged)"
    with pytest.raises(sealing.Shredded):
        inbound.get(engine, 1)
    with pytest.raises(attachments.AttachmentMissing, match="purged"):
        attachments.read(engine, gone, 1)
    assert CANARY in ticket_detail(engine, kept).entries[0].body_text
    assert ATTACHED.encode() in attachments.read(engine, kept, 1)[1]
    with write_session(engine) as session:  # a held message alone
        assert sealing.shred(session, inbound_ids=[2]) == 1
    with pytest.raises(sealing.Shredded):
        inbound.get(engine, 2)


def test_plaintext_rows_from_before_the_key_are_read_and_encrypted_on_demand(make_settings, database_url, tmp_path):
    plain_settings = make_settings()
    plain = sealing.attach(make_engine(database_url), storage_keyring(plain_settings))
    before = _ticket_from_canary(plain_settings, plain, "before the key")
    settings, engine = _sealed_engine(make_settings, database_url, _keygen(tmp_path / "k"))
    keyring = storage_keyring(settings)
    after = _ticket_from_canary(settings, engine, "after the key")
    assert CANARY in ticket_detail(engine, before).entries[0].body_text  # plaintext still reads
    counts = key_rotation.status(engine, keyring)["plaintext_rows"]
    assert counts["inbound_message.raw"] == 1 and counts["thread_entry.body_text"] >= 1

    done = key_rotation.encrypt_existing(engine, NOW, batch=1, max_batches=1)  # stopped after one batch...
    assert sum(done.values()) == 1
    key_rotation.encrypt_existing(engine, NOW, batch=1)  # ...and resumed
    assert set(key_rotation.status(engine, keyring)["plaintext_rows"].values()) == {0}
    for reference in (before, after):
        assert CANARY in ticket_detail(engine, reference).entries[0].body_text
        assert ATTACHED.encode() in attachments.read(engine, reference, 1)[1]
    with write_session(engine) as session:  # the old ticket's content now shreds with it
        ticket_id = session.scalar(select(InboundMessage.ticket_id).where(InboundMessage.id == 1))
        assert sealing.shred(session, ticket_ids=[ticket_id]) >= 2
    assert ticket_detail(engine, before).entries[0].body_text == "(content purged)"


def test_redeliveries_still_match_but_the_digest_is_keyed(make_settings, database_url, tmp_path):
    settings, engine = _sealed_engine(make_settings, database_url, _keygen(tmp_path / "k"))
    raw = _canary_report().as_bytes()
    inbound.store(engine, [Arrival("a@researcher.test", ["security@example.com"], "1.2.3.4", "h", raw, NOW)])
    digest = sealing.content_digest(engine, raw)
    import hashlib
    assert digest != hashlib.sha256(raw).hexdigest()
    assert inbound_lookups.known_hashes(engine, [digest]) == {digest}
    # A fetch source's second copy of the same bytes is found by the keyed digest and not stored.
    again = Arrival("a@researcher.test", ["security@example.com"], "1.2.3.4", "h", raw, NOW)
    assert inbound.store_new_from(engine, "1.2.3.4", [again]) == []


# -- rotation ---------------------------------------------------------------------------------


def test_rotation_stopped_midway_then_resumed_reads_with_only_the_new_key(make_settings, database_url, tmp_path,
                                                                          monkeypatch):
    old_key, new_key = _keygen(tmp_path / "old.key"), _keygen(tmp_path / "new.key")
    settings, engine = _sealed_engine(make_settings, database_url, old_key)
    reference = _ticket_from_canary(settings, engine)
    _ticket_from_canary(settings, engine, "another")
    # Mid-rotation, as every node runs it: the new key current, the old one still readable.
    during = make_settings(INTAKE_STORAGE__KEY_FILE=str(new_key),
                           INTAKE_STORAGE__PREVIOUS_KEY_FILES=f'["{old_key}"]')
    keyring = storage_keyring(during)
    engine = sealing.attach(make_engine(database_url), keyring)
    first = key_rotation.rotate(engine, keyring, batch=1, max_batches=1)
    assert first.rewrapped == 1 and first.remaining > 0
    by_key = {row["storage_key"]: row["count"] for row in key_rotation.status(engine, keyring)["data_keys"]}
    assert set(by_key) == {keyring.current.id, keyring.previous[0].id}
    assert CANARY in ticket_detail(engine, reference).entries[0].body_text  # both keys read meanwhile
    assert key_rotation.rotate(engine, keyring, batch=1).remaining == 0

    old_key.unlink()
    after = make_settings(INTAKE_STORAGE__KEY_FILE=str(new_key))
    engine = sealing.attach(make_engine(database_url), storage_keyring(after))
    key_rotation.check(engine, storage_keyring(after))
    assert CANARY in ticket_detail(engine, reference).entries[0].body_text
    assert ATTACHED.encode() in attachments.read(engine, reference, 1)[1]


@SQLITE_ONLY
def test_rotate_killed_midway_resumes_and_content_survives(make_settings, sqlite_url, config_file, tmp_path):
    old_key, new_key = _keygen(tmp_path / "old.key"), _keygen(tmp_path / "new.key")
    settings, engine = _sealed_engine(make_settings, sqlite_url, old_key)
    reference = _ticket_from_canary(settings, engine)
    keyring = storage_keyring(settings)
    with write_session(engine) as session:  # enough keys that one per commit takes a while
        session.execute(DataKey.__table__.insert(), [sealing.key_row(keyring, NOW)[0] for _ in range(3000)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")} | {
        "INTAKE_DATABASE__URL": sqlite_url, "INTAKE_STORAGE__KEY_FILE": str(old_key)}
    rotating = subprocess.Popen([str(INTAKE), "--config", str(config_file), "storage", "rotate", "--new-key",
                                 str(new_key), "--batch-size", "1"], env=env, stdout=subprocess.PIPE)
    assert rotating.stdout.readline().startswith(b"re-wrapped 1 ")
    os.kill(rotating.pid, signal.SIGKILL)
    rotating.wait(10)
    both = sealing.Keyring(key_rotation.read_storage_key(new_key), (key_rotation.read_storage_key(old_key),))
    remaining = {row["current"]: row["count"] for row in key_rotation.status(engine, both)["data_keys"]}
    assert remaining.get(False, 0) > 0 and remaining.get(True, 0) > 0  # killed midway

    _run(config_file, "storage", "rotate", "--new-key", str(new_key), env=env)  # resumed, to the end
    old_key.unlink()
    env["INTAKE_STORAGE__KEY_FILE"] = str(new_key)
    status = _run(config_file, "storage", "status", env=env).stdout.decode()
    assert "under storage key" in status and "NOT LOADED" not in status
    assert CANARY in _run(config_file, "show", reference, env=env).stdout.decode()


# -- wrong and missing keys -------------------------------------------------------------------


@SQLITE_ONLY
def test_wrong_or_missing_key_is_a_configuration_error_never_a_plaintext_write(
        make_settings, sqlite_url, config_file, tmp_path):
    key, other = _keygen(tmp_path / "k"), _keygen(tmp_path / "other")
    settings, engine = _sealed_engine(make_settings, sqlite_url, key)
    reference = _ticket_from_canary(settings, engine)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")} | {"INTAKE_DATABASE__URL": sqlite_url}

    wrong = _run(config_file, "show", reference, env=env | {"INTAKE_STORAGE__KEY_FILE": str(other)}, code=78)
    assert b"not loaded" in wrong.stderr and b"Traceback" not in wrong.stderr
    missing = _run(config_file, "show", reference, env=env | {"INTAKE_STORAGE__KEY_FILE": str(tmp_path / "no")},
                   code=78)
    assert b"cannot read it" in missing.stderr
    (tmp_path / "bad").write_text("not a key\n")
    bad = _run(config_file, "check-config", env=env | {"INTAKE_STORAGE__KEY_FILE": str(tmp_path / "bad")}, code=78)
    assert b"not a key made by" in bad.stderr
    unset = _run(config_file, "show", reference, env=env, code=78)  # sealed content, and no key given
    assert b"no [storage] key_file" in unset.stderr
    # The service refuses to start rather than accept mail it would store in clear.
    served = subprocess.run([str(INTAKE), "--config", str(config_file), "serve"],
                            env=env | {"INTAKE_SMTP__LISTEN": "127.0.0.1:0"},
                            capture_output=True, timeout=60)
    assert served.returncode == 78, served.stderr.decode()
    assert b"storage-key-refused" in served.stderr
    # keygen never overwrites
    assert CliRunner().invoke(main, ["storage", "keygen", str(key)]).exit_code == 1


def test_check_config_warns_without_a_key(config_file, tmp_path, monkeypatch):
    from intake.config import production
    from intake.config.settings import load_settings

    for name in [k for k in os.environ if k.startswith("INTAKE_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config_file.write_text(config_file.read_text().replace("development = true", "development = false"))
    assert any("no storage key" in w for w in production.warnings(load_settings(config_file)))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    _keygen(credentials / "storage-key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = load_settings(config_file)
    assert not any("no storage key" in w for w in production.warnings(settings))
    assert storage_keyring(settings).enabled  # the credential is the key



def test_a_purge_with_a_storage_key_destroys_the_tickets_data_keys(make_settings, database_url, tmp_path, cli):
    """Retention and encryption together: `intake purge` crypto-shreds what it erases, so the
    content stays unreadable in any copy made before (with the storage key of that time gone)."""
    settings, engine = _sealed_engine(make_settings, database_url, _keygen(tmp_path / "k"))
    gone = _ticket_from_canary(settings, engine, "to be purged")
    kept = _ticket_from_canary(settings, engine, "still open")
    with read_session(engine) as session:
        ticket_ids = {t.reference: t.id for t in all_tickets(engine)}
        keys_before = session.scalars(select(DataKey.ticket_id)).all()
    assert ticket_ids[gone] in keys_before and ticket_ids[kept] in keys_before
    cli("close", gone, "--reason", "invalid")
    later = (datetime.now(timezone.utc) + timedelta(days=366)).isoformat()
    cli("purge", "--json", "--now", later)
    with read_session(engine) as session:
        keys_after = session.scalars(select(DataKey.ticket_id)).all()
        message_keys = dict(session.execute(select(InboundMessage.ticket_id, InboundMessage.data_key)).all())
    assert ticket_ids[gone] not in keys_after and ticket_ids[kept] in keys_after
    assert message_keys[ticket_ids[gone]] is None and message_keys[ticket_ids[kept]] is not None
    assert "content purged on" in cli("show", gone).output
    assert CANARY in ticket_detail(engine, kept).entries[0].body_text
