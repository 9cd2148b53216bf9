"""[[fetch]] sources against a real Dovecot (tests/dovecot_harness.py) on a loopback port: every
message stored once, marked on the server only after the commit, nothing lost or doubled across
a dropped connection, a message deleted by another client, or a kill -9 of `intake fetch`."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from conftest import _fresh_postgres_database, all_tickets, free_port, process
from test_observability import _get, scrape, value, wait_until
from test_serve import _wait_for_log, serve, serve_env  # noqa: F401 - fixtures
from dovecot_harness import Dovecot, DovecotUnavailable, TokenInfo, start_dovecot
from intake.config import production
from intake.config.settings import ConfigError, Settings, load_settings
from intake.receive import fetch
from intake.store import inbound, schema
from intake.store.db import make_engine, read_session
from intake.store.inbound import store
from intake.sla import deadlines
from intake.store.models import Deadline, InboundMessage, Ticket
from intake.understand.arrival_time import MAX_QUEUED

INTAKE = Path(sys.executable).parent / "intake"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """What is fetched does not depend on the database: the store is the listener's, tested on both."""
    return sqlite_url


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    try:
        server = start_dovecot(free_port(), starttls_port=free_port())
    except DovecotUnavailable as exc:
        pytest.skip(f"fetch tests skipped: {exc}")
    try:
        yield server
    finally:
        server.stop()
        server.remove()


def _source_toml(dovecot: Dovecot, credential_file: Path, after: str = "seen", name: str = "hosted",
                 auth: str = "password") -> str:
    credential = (f'password_file = "{credential_file}"\n' if auth == "password" else
                  f'auth = "oauth2"\ntoken_file = "{credential_file}"\n')
    return (f'\n[[fetch]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = "imaps"\n'
            f'ca_file = "{dovecot.ca_file}"\nuser = "{dovecot.user}"\n{credential}'
            f'after = "{after}"\npoll_interval = 1\n')


@pytest.fixture
def configure(dovecot: Dovecot, config_file: Path, make_settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings with one [[fetch]] source on the test's Dovecot, its password in a file."""
    password_file = tmp_path / "imap-password"
    password_file.write_text(dovecot.password + "\n")

    def make(after: str = "seen", **env: str) -> Settings:
        config_file.write_text(config_file.read_text() + _source_toml(dovecot, password_file, after))
        return make_settings(**env)

    return make


def _messages(count: int, tag: str = "m") -> list[bytes]:
    # Distinct bytes each, a few KB: a report with some text, as mail from a web form looks.
    body = b"Steps to reproduce: open the login form and paste the payload.\r\n" * 60
    return [(b"Return-Path: <alice@researcher.test>\r\nDelivered-To: security@example.com\r\n"
             b"From: Alice <alice@researcher.test>\r\nTo: Security <security@example.com>\r\n"
             b"Subject: report %s-%d\r\nMessage-ID: <%s-%d@researcher.test>\r\n\r\n" % (tag.encode(), i, tag.encode(), i)
             + body) for i in range(count)]


def _stored(engine, peer: str = "imap:hosted") -> list[inbound.StoredMessage]:  # type: ignore[no-untyped-def]
    with read_session(engine) as session:
        ids = list(session.scalars(select(InboundMessage.id).where(InboundMessage.peer == peer)))
    return list(inbound.by_ids(engine, ids))


@pytest.mark.parametrize("after", ["seen", "move:Archive", "delete"])
def test_200_messages_are_stored_once_then_marked_and_a_second_pass_stores_nothing(configure, dovecot: Dovecot,
                                                                                   after: str):
    settings = configure(after)
    engine = make_engine(settings.database_url)
    sent = _messages(200)
    dovecot.append(sent)
    source = settings.fetch[0]
    started = time.monotonic()
    first = fetch.fetch_once(settings, source, engine)
    rate = 200 / (time.monotonic() - started)
    print(f"fetch rate ({after}): {rate:.0f} messages/s")
    assert (first.found, first.stored, first.duplicates, first.marked) == (200, 200, 0, 200)
    stored = _stored(engine)
    assert sorted(message.raw for message in stored) == sorted(sent)  # the bytes as the server had them
    assert {tuple(message.rcpt_tos) for message in stored} == {("security@example.com",)}
    assert {message.mail_from for message in stored} == {"alice@researcher.test"}
    assert all("with IMAP" in message.trace and "fetch source hosted" in message.trace for message in stored)
    expected = {"seen": ((200, 200), None), "move:Archive": ((0, 0), (200, 0)), "delete": ((0, 0), None)}[after]
    assert dovecot.folder_state("INBOX") == expected[0]
    if expected[1] is not None:
        assert dovecot.folder_state("Archive") == expected[1]
    second = fetch.fetch_once(settings, source, engine)
    assert (second.found, second.stored) == (0, 0)
    assert len(_stored(engine)) == 200


def test_a_pass_that_stored_but_did_not_mark_is_finished_by_the_next_without_doubles(configure, dovecot: Dovecot):
    """A crash between the commit and the marking: the messages are on the server unmarked and in
    the store; the next pass marks them and stores only what is new."""
    settings = configure("seen")
    engine = make_engine(settings.database_url)
    sent = _messages(30)
    dovecot.append(sent)
    source = settings.fetch[0]
    now = fetch.datetime.now(fetch.timezone.utc)
    store(engine, [fetch.arrival(settings, source, raw, now, 1, n) for n, raw in enumerate(sent[:12])])
    result = fetch.fetch_once(settings, source, engine, batch=7)
    assert (result.found, result.stored, result.duplicates, result.marked) == (30, 18, 12, 30)
    assert sorted(message.raw for message in _stored(engine)) == sorted(sent)
    assert dovecot.folder_state() == (30, 30)


def _filled_with_another_session(dovecot: Dovecot, count: int):  # type: ignore[no-untyped-def]
    """*count* messages appended to INBOX, and a second IMAP session on it (someone else's mail
    program): the messages, that session and their UIDs."""
    sent = _messages(count)
    dovecot.append(sent)
    other = dovecot.client()
    other.select_folder("INBOX")
    return sent, other, sorted(other.search("ALL"))


def test_a_dropped_connection_loses_nothing_and_a_message_deleted_meanwhile_is_skipped(configure, dovecot: Dovecot):
    settings = configure("seen")
    engine = make_engine(settings.database_url)
    sent, other, uids = _filled_with_another_session(dovecot, 60)
    source = settings.fetch[0]

    batches: list[int] = []

    def meanwhile(progress: fetch.PassResult) -> None:
        batches.append(progress.marked)
        if len(batches) == 1:  # another mail program deletes a message this pass has not reached
            other.delete_messages([uids[-1]])
            other.expunge()
        elif len(batches) == 3:  # then the server drops every connection
            assert dovecot.kill_imap_sessions() >= 1

    with pytest.raises(fetch.FetchError):
        fetch.fetch_once(settings, source, engine, batch=10, after_batch=meanwhile)
    assert batches == [10, 20, 30] and len(_stored(engine)) == 30
    result = fetch.fetch_once(settings, source, engine, batch=10)
    assert (result.found, result.stored, result.marked) == (29, 29, 29)
    assert sorted(message.raw for message in _stored(engine)) == sorted(sent[:-1])
    assert dovecot.folder_state() == (59, 59)


def test_a_message_expunged_under_a_running_pass_is_skipped_not_fatal(configure, dovecot: Dovecot):
    """Dovecot refuses a FETCH naming a message another session expunged (NO [EXPUNGEISSUED]): the
    rest of that batch is still stored."""
    settings = configure("delete")
    engine = make_engine(settings.database_url)
    sent, other, uids = _filled_with_another_session(dovecot, 20)
    source = settings.fetch[0]

    def meanwhile(progress: fetch.PassResult) -> None:
        if progress.marked == 5:  # after the first batch only: the second marks 3
            other.delete_messages(uids[7:9])  # both in the next batch
            other.expunge()

    result = fetch.fetch_once(settings, source, engine, batch=5, after_batch=meanwhile)
    assert (result.found, result.stored, result.vanished) == (20, 18, 2)
    assert sorted(message.raw for message in _stored(engine)) == sorted(sent[:7] + sent[9:])
    assert dovecot.folder_state() == (0, 0)


def test_kill_9_of_intake_fetch_midway_then_a_rerun_stores_exactly_200(configure, dovecot: Dovecot, config_file: Path,
                                                                       sqlite_url: str):
    settings = configure("seen")
    schema.upgrade(make_engine(settings.database_url))
    dovecot.append(_messages(200))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")} | {
        "INTAKE_DATABASE__URL": sqlite_url}
    database = sqlite_url.removeprefix("sqlite:///")
    command = [str(INTAKE), "--config", str(config_file), "fetch", "--once"]

    def count() -> int:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT count(*) FROM inbound_message WHERE peer = 'imap:hosted'").fetchone()[0]

    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while count() == 0 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    at_kill = count()
    assert 0 < at_kill < 200, f"the kill did not land midway ({at_kill} stored)"
    assert dovecot.folder_state()[1] < 200
    rerun = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert f", {200 - at_kill} stored, " in rerun.stdout, rerun.stdout
    assert count() == 200
    assert dovecot.folder_state() == (200, 200)


def test_intake_fetch_without_once_keeps_fetching_until_sigterm(configure, dovecot: Dovecot, config_file: Path,
                                                                sqlite_url: str):
    settings = configure("seen")
    schema.upgrade(make_engine(settings.database_url))
    dovecot.append(_messages(3, "before"))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")} | {
        "INTAKE_DATABASE__URL": sqlite_url}
    process = subprocess.Popen([str(INTAKE), "--config", str(config_file), "fetch", "--source", "hosted"],
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        engine = make_engine(settings.database_url)
        wait_until(lambda: len(_stored(engine)) == 3, "the first pass", timeout=30)
        dovecot.append(_messages(2, "after"))  # IDLE (or the next poll) brings these
        wait_until(lambda: len(_stored(engine)) == 5, "the loop to fetch new mail", timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, process.stderr.read()
    assert dovecot.folder_state() == (5, 5)


def test_starttls_source_fetches_too(configure, dovecot: Dovecot):
    settings = configure("seen")
    dovecot.append(_messages(4))
    source = settings.fetch[0].model_copy(update={"tls": "starttls", "port": dovecot.starttls_port})
    result = fetch.fetch_once(settings, source, make_engine(settings.database_url))
    assert (result.found, result.stored, result.marked) == (4, 4, 4)
    assert dovecot.folder_state() == (4, 4)


def test_a_message_over_the_size_limit_is_left_on_the_server(configure, dovecot: Dovecot):
    settings = configure("delete", INTAKE_SMTP__MAX_MESSAGE_SIZE="8192")
    small, big = _messages(3), _messages(1, "big")[0] + b"x" * 8192
    dovecot.append([*small, big])
    result = fetch.fetch_once(settings, settings.fetch[0], make_engine(settings.database_url))
    assert (result.found, result.stored, result.too_big) == (4, 3, 1)
    assert sorted(m.raw for m in _stored(make_engine(settings.database_url))) == sorted(small)
    assert dovecot.folder_state() == (1, 0)


def test_wrong_password_or_untrusted_certificate_fails_the_pass_and_stores_nothing(configure, dovecot: Dovecot,
                                                                                   tmp_path: Path):
    settings = configure("seen")
    dovecot.append(_messages(3))
    engine = make_engine(settings.database_url)
    (tmp_path / "imap-password").write_text("wrong\n")
    with pytest.raises(fetch.FetchError):
        fetch.fetch_once(settings, settings.fetch[0], engine)
    (tmp_path / "imap-password").write_text(dovecot.password)
    untrusted = settings.fetch[0].model_copy(update={"ca_file": None})  # the system's CAs do not know it
    with pytest.raises(fetch.FetchError):
        fetch.fetch_once(settings, untrusted, engine)
    # (Not looked at on the server: Dovecot holds the next login from this address back 4 s.)
    assert _stored(engine) == []


@pytest.mark.parametrize("fragment, names", [
    ('tls = "plain"', ["fetch.0.tls"]),
    ('after = "archive"', ["fetch.0.after", "move:<folder>"]),
    ('name = "Has Spaces"', ["fetch.0.name"]),
    ('password = "hunter2"', ["fetch.0.password", "unknown key"]),
])
def test_bad_fetch_sources_are_refused_naming_the_key(tmp_path: Path, fragment: str, names: list[str],
                                                      config_file: Path):
    key = fragment.split(" ")[0]
    lines = [line for line in _source_toml(Dovecot(tmp_path, 993, tmp_path / "ca.pem"), tmp_path / "pw").splitlines()
             if not line.startswith(f"{key} ")]
    config_file.write_text(config_file.read_text() + "\n".join(lines) + f"\n{fragment}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config_file)
    for name in names:
        assert name in str(raised.value)


def test_source_names_are_unique_and_the_password_comes_from_the_credentials_directory(tmp_path: Path,
                                                                                       config_file: Path):
    shipped = config_file.read_text()
    one = _source_toml(Dovecot(tmp_path, 993, tmp_path / "ca.pem"), tmp_path / "pw").replace(
        f'password_file = "{tmp_path / "pw"}"\n', "")
    config_file.write_text(shipped + one + one)
    with pytest.raises(ConfigError, match="unique"):
        load_settings(config_file)
    config_file.write_text(shipped + one)
    source = load_settings(config_file).fetch[0]
    (tmp_path / "fetch-hosted").write_text(" from systemd \n")  # a password keeps its spaces
    assert source.credential(tmp_path, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == " from systemd "
    with pytest.raises(FileNotFoundError, match="password_file.*fetch-hosted"):
        source.credential(tmp_path, {})
    oauth2 = source.model_copy(update={"auth": "oauth2"})
    assert oauth2.credential(tmp_path, {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "from systemd"
    with pytest.raises(FileNotFoundError, match="token_file.*fetch-hosted"):
        oauth2.credential(tmp_path, {})


def test_the_shipped_example_sources_load_and_name_every_key(tmp_path: Path, config_file: Path):
    """The commented [[fetch]] examples (a password source, an OAuth2 one) load as they are, and
    between them name every key a source has."""
    shipped = config_file.read_text()
    block = shipped[shipped.index("# [[fetch]]"):]
    block = block[:block.index("\n\n")]
    lines = [line.removeprefix("# ").split("  #")[0].rstrip() for line in block.splitlines()]
    example = "\n".join(line for line in lines if line == "[[fetch]]" or re.fullmatch(r"\w+ = .+", line))
    (config_file.parent / "imap-token").write_text("ya29.example\n")  # the OAuth2 example's token_file
    config_file.write_text(shipped + "\n" + example + "\n")
    password, oauth2 = load_settings(config_file).fetch
    assert (password.name, password.tls, password.after, password.folder, password.auth) == (
        "hosted", "imaps", "seen", "INBOX", "password")
    assert (oauth2.auth, oauth2.oauth2_mechanism, oauth2.port) == ("oauth2", "XOAUTH2", 993)
    assert oauth2.credential(config_file.parent) == "ya29.example"
    assert {line.split(" =")[0] for line in example.splitlines() if " = " in line} == set(type(password).model_fields)


def test_serve_fetches_processes_and_reports_each_source(configure, dovecot: Dovecot, serve, serve_env,  # noqa: F811
                                                         sqlite_url: str):
    configure("seen")
    dovecot.append(_messages(2, "early"))  # found by the first pass
    port = free_port()
    serve_env.update(INTAKE_METRICS__LISTEN=f"127.0.0.1:{port}")
    server = serve()
    server.start()
    dovecot.append(_messages(3, "late"))  # found when IDLE (or the next poll) says new mail is there
    database = sqlite_url.removeprefix("sqlite:///")

    def processed() -> int:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT count(*) FROM inbound_message WHERE peer = 'imap:hosted' "
                                      "AND status != 'pending' AND ticket_id IS NOT NULL").fetchone()[0]

    wait_until(lambda: processed() == 5, "the fetched reports to become tickets", timeout=30)
    status, ready = _get(port, "/readyz")
    assert status == 200 and json.loads(ready)["checks"]["fetch:hosted"] == "ok", ready
    samples = scrape(port)
    assert value(samples, "intake_fetch_stored_total", source="hosted") == 5
    assert value(samples, "intake_fetch_failures", source="hosted") == 0
    assert value(samples, "intake_fetch_last_success_timestamp_seconds", source="hosted") > time.time() - 60
    assert dovecot.folder_state() == (5, 5)
    assert server.stop() == 0


def test_a_report_that_waited_in_the_mailbox_starts_its_sla_when_the_mailbox_got_it_bounded(
        configure, dovecot: Dovecot):
    """INTERNALDATE is when the hosted mailbox got the message: the report that waited there six
    hours (intake was down) starts its SLA then, not when intake fetched it; one that was put in
    the folder with a date 400 days back (from an archive) starts at most MAX_QUEUED before."""
    settings = configure("seen")
    engine = make_engine(settings.database_url)
    before = datetime.now(timezone.utc)
    waited_since, archived_since = before.replace(microsecond=0) - timedelta(hours=6), before - timedelta(days=400)
    [waited], [archived] = _messages(1, "waited"), _messages(1, "archived")
    with dovecot.client() as client:  # APPEND with an INTERNALDATE, as the provider's delivery set it
        client.append("INBOX", waited, msg_time=waited_since)
        client.append("INBOX", archived, msg_time=archived_since)
    assert fetch.fetch_once(settings, settings.fetch[0], engine).stored == 2
    rows = {row.raw: row for row in _stored(engine)}
    assert rows[waited].arrived_at == waited_since and rows[waited].received_at >= before
    assert f"internaldate {format_datetime(waited_since)})" in rows[waited].trace
    assert rows[archived].arrived_at == rows[archived].received_at - MAX_QUEUED
    process(settings, engine)
    with read_session(engine) as session:
        for raw, start in ((waited, waited_since), (archived, rows[archived].received_at - MAX_QUEUED)):
            inbound = session.get(InboundMessage, rows[raw].id)
            ticket = session.get(Ticket, inbound.ticket_id)
            assert ticket.received_at == start
            due = {row.stage: row.due_at for row in session.scalars(select(Deadline).where(
                Deadline.ticket_id == ticket.id))}
            expected = {deadline.stage: deadline.due for deadline, _ in
                        deadlines.explain(settings, ticket.policy, start, None, None)}
            from_fetch_time = {deadline.stage: deadline.due for deadline, _ in
                               deadlines.explain(settings, ticket.policy, inbound.received_at, None, None)}
            assert due == expected != from_fetch_time


def test_a_message_without_internaldate_starts_when_intake_fetched_it(configure):
    settings = configure("seen")
    now = datetime.now(timezone.utc)
    message = fetch.arrival(settings, settings.fetch[0], _messages(1)[0], now, 1, 1, None)
    assert message.arrived_at == now and "internaldate" not in message.trace


GOOD_TOKEN, EXPIRED_TOKEN = "ya29.good-for-an-hour", "ya29.expired"


@pytest.fixture
def tokeninfo() -> Iterator[TokenInfo]:
    """The identity service the OAuth2 Dovecot asks about each token: GOOD_TOKEN is valid."""
    endpoint = TokenInfo()
    endpoint.valid.add(GOOD_TOKEN)
    try:
        yield endpoint
    finally:
        endpoint.close()


@pytest.fixture
def oauth2_dovecot(tokeninfo: TokenInfo) -> Iterator[Dovecot]:
    try:
        server = start_dovecot(free_port(), tokeninfo=tokeninfo)
    except DovecotUnavailable as exc:
        pytest.skip(f"fetch tests skipped: {exc}")
    try:
        yield server
    finally:
        server.stop()
        server.remove()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "imap-token"
    path.write_text(GOOD_TOKEN + "\n")
    return path


@pytest.fixture
def configure_oauth2(oauth2_dovecot: Dovecot, token_file: Path, config_file: Path, make_settings):  # type: ignore[no-untyped-def]
    """Settings with one OAuth2 [[fetch]] source on the OAuth2 Dovecot, its token in *token_file*."""

    def make(mechanism: str = "XOAUTH2") -> Settings:
        config_file.write_text(config_file.read_text() + _source_toml(oauth2_dovecot, token_file, auth="oauth2")
                               + f'oauth2_mechanism = "{mechanism}"\n')
        return make_settings()

    return make


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_an_oauth2_source_fetches_with_the_token_from_its_file(configure_oauth2, oauth2_dovecot: Dovecot,
                                                              tokeninfo: TokenInfo, mechanism: str):
    settings = configure_oauth2(mechanism)
    sent = _messages(3)
    oauth2_dovecot.append(sent)  # (the harness's own client logs in with the password)
    engine = make_engine(settings.database_url)
    result = fetch.fetch_once(settings, settings.fetch[0], engine)
    assert (result.found, result.stored, result.marked) == (3, 3, 3)
    assert sorted(message.raw for message in _stored(engine)) == sorted(sent)
    assert tokeninfo.asked == [GOOD_TOKEN]  # the server checked the token intake sent
    assert oauth2_dovecot.folder_state() == (3, 3)


def test_a_rejected_token_stores_nothing_says_so_and_a_rewritten_token_file_is_used_without_restart(
        configure_oauth2, oauth2_dovecot: Dovecot, tokeninfo: TokenInfo, token_file: Path, caplog):
    """The refresher stopped: the file holds an expired token. The source fails with back-off,
    naming itself and the likely cause; once the file is rewritten the running loop's next try
    logs in with the new token (no restart) and fetches what waited."""
    settings = configure_oauth2()
    oauth2_dovecot.append(_messages(3))
    engine = make_engine(settings.database_url)
    token_file.write_text(EXPIRED_TOKEN + "\n")
    stop, state = threading.Event(), fetch.SourceState("hosted")
    loop = threading.Thread(target=fetch.run, args=(settings, settings.fetch[0], engine, stop, state))
    loop.start()
    try:
        wait_until(lambda: state.failures == 1, "the first login to be refused", timeout=15)
        # At once: the loop tries again after its back-off (5 s), which this must come before.
        token_file.write_text(GOOD_TOKEN)  # the refresher runs again (no newline: either is read)
        assert _stored(engine) == []
        report = state.check()
        assert report.startswith("failing (1 tries in a row; last success never): TokenRejected: fetch source "
                                 "hosted: token rejected (XOAUTH2: ") and "is the refresher running?" in report
        assert "Its token file was last written 20" in report
        assert any("event=fetch-failed source=hosted" in line and "token rejected" in line
                   for line in caplog.messages)
        wait_until(lambda: state.stored == 3, "the next try (after back-off) to fetch with the new token",
                   timeout=30)
        assert state.check() == "ok" and state.failures == 0
    finally:
        stop.set()
        loop.join(10)
    assert not loop.is_alive()
    assert tokeninfo.asked == [EXPIRED_TOKEN, GOOD_TOKEN]
    assert len(_stored(engine)) == 3 and oauth2_dovecot.folder_state() == (3, 3)


def test_a_token_rotated_between_passes_is_read_again_at_the_next_login(configure_oauth2, oauth2_dovecot: Dovecot,
                                                                       tokeninfo: TokenInfo, token_file: Path):
    settings = configure_oauth2()
    engine = make_engine(settings.database_url)
    oauth2_dovecot.append(_messages(2, "first"))
    assert fetch.fetch_once(settings, settings.fetch[0], engine).stored == 2
    tokeninfo.valid = {"ya29.next-hour"}  # the provider let the first token expire ...
    token_file.write_text("ya29.next-hour\n")  # ... and the refresher wrote the next one
    oauth2_dovecot.append(_messages(2, "second"))
    assert fetch.fetch_once(settings, settings.fetch[0], engine).stored == 2
    assert tokeninfo.asked == [GOOD_TOKEN, "ya29.next-hour"]
    assert len(_stored(engine)) == 4


def _source_without_credential(tmp_path: Path) -> str:
    """A [[fetch]] table naming no credential file (and a server nobody connects to)."""
    return "".join(line + "\n" for line in _source_toml(Dovecot(tmp_path, 993, tmp_path / "ca.pem"),
                                                      tmp_path / "pw").splitlines()
                   if not line.startswith("password_file"))


def test_an_oauth2_source_on_the_systemd_credential_is_warned_about(tmp_path: Path, config_file: Path):
    """LoadCredential= copies the token once, at start: check-config and serve say so."""
    source = _source_without_credential(tmp_path)
    config_file.write_text(config_file.read_text() + source + 'auth = "oauth2"\n')
    [warning] = [w for w in production.warnings(load_settings(config_file)) if w.startswith("fetch.")]
    assert warning.startswith("fetch.0: source 'hosted' reads its OAuth2 token from $CREDENTIALS_DIRECTORY/fetch-hosted")
    (tmp_path / "token").write_text("ya29.token\n")
    config_file.write_text(config_file.read_text() + 'token_file = "token"\n')
    assert not [w for w in production.warnings(load_settings(config_file)) if w.startswith("fetch.")]


@pytest.mark.parametrize("lines, names", [
    ('auth = "kerberos"\n', ["fetch.0.auth", "'password' or 'oauth2'"]),
    ('auth = "oauth2"\ntoken_file = "no-such-token"\n', ["fetch.0.token_file", "no-such-token", "does not exist"]),
    ('auth = "oauth2"\npassword_file = "pw"\n', ["fetch.0", "password_file is for auth"]),
    ('token_file = "token"\n', ["fetch.0", "token_file is for auth"]),
    ('auth = "oauth2"\noauth2_mechanism = "PLAIN"\n', ["fetch.0.oauth2_mechanism"]),
])
def test_bad_oauth2_settings_are_refused_naming_the_key(tmp_path: Path, config_file: Path, lines: str,
                                                       names: list[str]):
    (tmp_path / "token").write_text("ya29.token\n")
    source = _source_without_credential(tmp_path)
    config_file.write_text(config_file.read_text() + source + lines)
    with pytest.raises(ConfigError) as raised:
        load_settings(config_file)
    for name in names:
        assert name in str(raised.value)


def test_sighup_starts_an_added_source_and_stops_a_removed_one(configure, dovecot: Dovecot, serve, serve_env,  # noqa: F811
                                                               sqlite_url: str, config_file: Path, tmp_path: Path):
    """Through the real `intake serve`: a [[fetch]] source added to config.toml starts fetching at
    SIGHUP, without a restart; one removed stops and leaves /readyz."""
    configure("seen")
    shipped_and_hosted = config_file.read_text()
    dovecot.append(_messages(2, "partner"), folder="Partner")
    port = free_port()
    serve_env.update(INTAKE_METRICS__LISTEN=f"127.0.0.1:{port}")
    server = serve()
    server.start()
    database = sqlite_url.removeprefix("sqlite:///")

    def stored_from(source: str) -> int:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute("SELECT count(*) FROM inbound_message WHERE peer = ?",
                                      (f"imap:{source}",)).fetchone()[0]

    def checks() -> dict[str, str]:
        return {name: check for name, check in json.loads(_get(port, "/readyz")[1])["checks"].items()
                if name.startswith("fetch:")}

    wait_until(lambda: checks() == {"fetch:hosted": "ok"}, "the configured source to work", timeout=30)
    partner = _source_toml(dovecot, tmp_path / "imap-password", name="partner") + 'folder = "Partner"\n'
    config_file.write_text(shipped_and_hosted + partner)
    server.process.send_signal(signal.SIGHUP)
    _wait_for_log(server, "event=fetch-reloaded added=partner removed=- restarted=-")
    wait_until(lambda: stored_from("partner") == 2, "the added source's mail to be stored", timeout=30)
    assert dovecot.folder_state("Partner") == (2, 2)
    _wait_for_log(server, "event=reloaded restart_needed=-")  # fetch no longer needs a restart
    config_file.write_text(shipped_and_hosted[:shipped_and_hosted.rindex("\n[[fetch]]")] + partner)
    server.process.send_signal(signal.SIGHUP)
    _wait_for_log(server, "event=fetch-reloaded added=- removed=hosted restarted=-")
    wait_until(lambda: checks() == {"fetch:partner": "ok"}, "the removed source to leave /readyz", timeout=30)
    dovecot.append(_messages(1, "unfetched"))  # INBOX, which only the removed source fetched
    dovecot.append(_messages(1, "partner-later"), folder="Partner")
    wait_until(lambda: stored_from("partner") == 3, "the remaining source to go on", timeout=30)
    assert stored_from("hosted") == 0 and dovecot.folder_state("INBOX") == (1, 0)
    assert server.stop() == 0


def test_reconfigure_restarts_a_changed_or_failing_source_and_leaves_a_working_one_alone(
        configure, dovecot: Dovecot, tmp_path: Path):
    """A reload re-reads credentials where it matters: a source failing on a wrong password is
    restarted at once (not after its back-off) and logs in with the fixed file; a source whose
    table changed restarts on the new table; an unchanged working one keeps its session."""
    (tmp_path / "imap-password").write_text("wrong\n")
    settings = configure("seen")
    engine = make_engine(settings.database_url)
    dovecot.append(_messages(2))
    stored = []
    fetchers = fetch.Fetchers(settings, engine, stored.append)
    try:
        [failing] = fetchers.states
        wait_until(lambda: failing.failures == 1, "the wrong password to be refused", timeout=15)
        (tmp_path / "imap-password").write_text(dovecot.password)
        assert fetchers.reconfigure(settings, 10) == {"added": [], "removed": [], "restarted": ["hosted"]}
        [working] = fetchers.states
        # Well before the failed source's back-off (5 s, then Dovecot's own penalty) would have ended.
        wait_until(lambda: working.stored == 2, "the restarted source to log in with the fixed file", timeout=15)
        assert fetchers.reconfigure(settings, 10) == {"added": [], "removed": [], "restarted": []}
        assert fetchers.states == [working]
        slower = settings.model_copy(update={"fetch": [settings.fetch[0].model_copy(update={"poll_interval": 5})]})
        assert fetchers.reconfigure(slower, 10)["restarted"] == ["hosted"]
        assert fetchers.states[0] is not working
    finally:
        fetchers.stop(10)
    assert sum(stored) == 2 and len(_stored(engine)) == 2


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_two_fetchers_racing_on_one_mailbox_store_each_message_once(configure, dovecot: Dovecot, request,
                                                                    backend: str):
    """Two nodes fetching one mailbox (or a cron job beside the service): two passes at once, in
    lockstep batch by batch, each on its own connection. Each message is stored once (the check
    and the insert are one transaction under a per-source lock) and makes one ticket."""
    if backend == "sqlite":
        url, drop = request.getfixturevalue("sqlite_url"), (lambda: None)
    else:
        url, drop = _fresh_postgres_database(request.getfixturevalue("postgres_server"),
                                             request.getfixturevalue("postgres_template"))
    try:
        settings = configure("seen", INTAKE_DATABASE__URL=url)
        engine = make_engine(settings.database_url)
        sent = _messages(40, "race")
        dovecot.append(sent)
        lockstep = threading.Barrier(2, timeout=20)
        committed: list[int] = []  # how many each commit of either node stored

        def node() -> None:
            try:
                fetch.fetch_once(settings, settings.fetch[0], engine, batch=5, on_stored=committed.append,
                                 after_batch=lambda progress: lockstep.wait())
            except threading.BrokenBarrierError:  # the other node's pass ended first
                pass
            finally:
                lockstep.abort()

        nodes = [threading.Thread(target=node) for _ in range(2)]
        for thread in nodes:
            thread.start()
        for thread in nodes:
            thread.join(60)
        fetch.fetch_once(settings, settings.fetch[0], engine, on_stored=committed.append)  # what an ended pass left
        assert sorted(message.raw for message in _stored(engine)) == sorted(sent)
        assert sum(committed) == 40
        assert dovecot.folder_state() == (40, 40)
        process(settings, engine)
        assert len(all_tickets(engine)) == 40
        engine.dispose()
    finally:
        drop()


def test_the_back_off_doubles_within_bounds_and_a_failing_source_says_since_when_and_why():
    waits = [fetch.backoff(failures, poll_interval=1) for failures in range(1, 15)]
    assert waits[:4] == [5, 10, 20, 40] and max(waits) == fetch.MAX_BACKOFF == waits[-1]
    assert fetch.backoff(1, poll_interval=120) == 120  # never sooner than the next poll would be
    state = fetch.SourceState("hosted")
    assert state.check() == "ok"
    state.failures, state.last_error = 3, "LoginError: [AUTHENTICATIONFAILED]"
    assert state.check() == "failing (3 tries in a row; last success never): LoginError: [AUTHENTICATIONFAILED]"
