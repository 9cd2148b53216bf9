"""File modes: under umask 022, as `scripts/serve` and a shell run intake (the systemd unit's UMask
is not there), whatever holds reports is closed to other users: the database, its lock and backups
0660 in 0770 folders (maintainers in the service's group use them), the rest 0600 in 0700 folders."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import deliver_outbox, process, report, smtp_send
from intake.store import backup
from intake.store.db import make_engine


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url  # PostgreSQL keeps its own files


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_everything_that_holds_reports_is_private_under_umask_022(umask_022, make_settings, start_intake_listener,
                                                                    cli, tmp_path):
    state = tmp_path / "state" / "var"  # neither exists yet: intake makes both
    settings = make_settings(INTAKE_DATABASE__URL=f"sqlite:///{state / 'intake.db'}",
                             INTAKE_OUTBOUND__MAILDIR=str(state / "outbox"))
    running = start_intake_listener(settings)
    message = report(body="the PoC\n")
    message.add_attachment(b"secret exploit", maintype="application", subtype="octet-stream", filename="poc.bin")
    smtp_send(running.port, message)
    [reference] = process(settings, running.engine).tickets_opened
    assert deliver_outbox(settings, running.engine) == {"sent": 1}

    assert _mode(tmp_path / "state") == 0o770 and _mode(state) == 0o770
    for name in ("intake.db", "intake.db-wal", "intake.db-shm", "intake.db.writer"):
        assert _mode(state / name) == 0o660, name
    maildir = state / "outbox"
    assert {folder.name: _mode(folder) for folder in [maildir, *maildir.iterdir()]} == {
        "outbox": 0o700, "tmp": 0o700, "new": 0o700, "cur": 0o700}
    [acknowledgement] = (maildir / "new").iterdir()
    assert _mode(acknowledgement) == 0o600 and b"Subject:" in acknowledgement.read_bytes()

    cli("backup", str(tmp_path / "copy.db"))
    cli("attachment", reference, "1", "-o", str(tmp_path / "poc.bin"))
    cli("advisory", reference, "-o", str(tmp_path / "draft.json"))
    assert _mode(tmp_path / "copy.db") == 0o660
    for name in ("poc.bin", "draft.json"):  # the maintainer's own files
        assert _mode(tmp_path / name) == 0o600, name

    restored = tmp_path / "restored" / "intake.db"
    backup.restore_sqlite(make_engine(f"sqlite:///{restored}"), tmp_path / "copy.db")
    assert _mode(restored) == 0o660 and _mode(restored.parent) == 0o770


def test_check_config_warns_about_a_database_others_can_read(umask_022, make_settings, cli, tmp_path):
    database = tmp_path / "old" / "intake.db"
    make_settings(INTAKE_DATABASE__URL=f"sqlite:///{database}")
    database.parent.mkdir()
    database.write_bytes(b"")
    database.chmod(0o644)  # as an intake before issue 12 made it under umask 022
    result = cli("check-config")
    assert f"warning: {database} is open to other users (mode 0644) and holds reports: chmod o= {database}" \
        in result.output
    database.chmod(0o660)  # the group's, as intake makes it
    assert "open to other users" not in cli("check-config").output
