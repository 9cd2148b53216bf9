"""Running intake as an installed service used by a team: the configuration both the unit and a
maintainer's `intake` read, check-config's production warnings, the name intake greets with, the
actor of a CLI action (the Unix account of the uid), and the CLI run from a second Unix account
in the service's group."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner, Result

from conftest import SHIPPED_CONFIG, deliver_outbox, free_port, process, report, smtp_send
from intake.cli.app import main
from intake.config import production, settings as settings_module
from intake.config.settings import EXIT_CONFIG, ConfigError, load_settings
from intake.store import private_files
from intake.tickets import reads

INTAKE = Path(sys.executable).parent / "intake"
# A production configuration: what `intake init` writes, in substance.
PRODUCTION = {
    "development = true": "development = false",
    'addresses = ["security@example.com"]': 'addresses = ["security@vaixus.io"]',
    'message_id_domain = "example.com"': 'message_id_domain = "vaixus.io"',
    'hostname = "localhost"': 'hostname = "mx.vaixus.io"',
    'transport = "maildir"': 'transport = "smtp"',
}
MAINTAINER = '\n[[maintainers]]\nname = "Ana Maintainer"\nemail = "ana@vaixus.io"\nlogin = "{login}"\n'


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    return sqlite_url  # file modes and accounts: SQLite's files


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith(("INTAKE_", "LISTEN_"))]:
        monkeypatch.delenv(key)


def _config(tmp_path: Path, replacements: dict[str, str], extra: str = "", name: str = "config.toml") -> Path:
    text = SHIPPED_CONFIG.read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text + extra)
    return path


def _environment(**extra: str) -> dict[str, str]:
    """The test's environment without INTAKE_*, $USER and $LOGNAME, plus *extra*."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_") and k not in ("USER", "LOGNAME")}
    return kept | extra


def _intake(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`intake ARGS` in a process of its own: as another account (*prefix*), or for its exit status
    and stderr exactly as an operator sees them."""
    return subprocess.run([*prefix, str(INTAKE), *args], capture_output=True, text=True, timeout=60,
                          env=env or _environment())


def _in_process(*args: str, **env: str | None) -> Result:
    """`intake ARGS` in this process (a second's start-up less), with $USER and $LOGNAME unset
    unless *env* sets them."""
    return CliRunner().invoke(main, list(args), env={"USER": None, "LOGNAME": None, **env}, catch_exceptions=False)


# -- check-config: warnings about a configuration meant for production ----------------------


def test_check_config_warns_about_placeholders_maildir_no_maintainers_helo_and_size(tmp_path: Path):
    unfinished = _config(tmp_path, {"development = true": "development = false",
                                    "max_message_size = 36700160": "max_message_size = 26214400"})
    result = _intake("--config", str(unfinished), "check-config")
    assert result.returncode == 0, result.stderr  # warnings leave the status at 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("intake: warning: ")]
    expected = ["smtp.addresses: security@example.com is a placeholder",
                "intake.message_id_domain: example.com is a placeholder",
                '[outbound] transport = "maildir": acknowledgements and replies are written to',
                "no [[maintainers]]", "smtp.hostname is 'localhost', not a fully qualified domain name",
                "reject_non_fqdn_helo_hostname", "smtp.max_message_size is 26214400 bytes, below 36700160",
                "message_size_limit", "no storage key: report content is stored unencrypted",
                "no audit key ([audit] key_file or the audit-key credential)"]
    for text in expected:
        assert text in result.stderr, text
    assert len(warnings) == 8, result.stderr
    assert "listens on smtp.listen 127.0.0.1:8025 (unless systemd passes sockets)" in result.stdout

    # The shipped development configuration: only the size warning would apply, and its size is enough.
    assert _in_process("--config", str(SHIPPED_CONFIG), "check-config").stderr == ""
    development = load_settings(_config(tmp_path, {"max_message_size = 36700160": "max_message_size = 26214400"},
                                        name="dev.toml"))
    assert [w.split(" is ")[0] for w in production.warnings(development)] == ["smtp.max_message_size"]

    encrypted = {'# key_file = "/etc/intake/storage.key"': 'key_file = "/etc/intake/storage.key"'}
    finished = load_settings(_config(tmp_path, PRODUCTION | encrypted, MAINTAINER.format(login="ana"),
                                     name="prod.toml"))
    assert production.warnings(finished) == []


@pytest.mark.parametrize("domain, placeholder", [
    ("example.com", True), ("EXAMPLE.NET.", True), ("security.example.org", True), ("acme.example", True),
    ("lab.test", True), ("x.invalid", True), ("vaixus.io", False), ("example.community", False),
    ("notexample.com", False)])
def test_placeholder_domains(domain: str, placeholder: bool):
    assert production.is_placeholder_domain(domain) is placeholder


@pytest.mark.parametrize("name, fqdn", [
    ("mx.vaixus.io", True), ("mx.vaixus.io.", True), ("localhost", False), ("localhost.localdomain", False),
    ("mail", False), ("192.0.2.7", False), ("[2001:db8::1]", False), ("host.localhost", False)])
def test_helo_names(name: str, fqdn: bool):
    assert production.is_fqdn(name) is fqdn


_AS_SYSTEMD_WOULD = """
import os, sys
os.dup2(int(os.environ.pop("PASSED_FD")), 3)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="smtp", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_check_config_reports_the_socket_systemd_passes_not_smtp_listen():
    with socket.create_server(("127.0.0.1", 0)) as passed:
        port = passed.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-c", _AS_SYSTEMD_WOULD, str(INTAKE), "--config", str(SHIPPED_CONFIG), "check-config"],
            env=_environment(PASSED_FD=str(passed.fileno())), pass_fds=(passed.fileno(),), capture_output=True,
            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"listens on 127.0.0.1:{port} (sockets passed by systemd)" in result.stdout
    assert "smtp.listen" not in result.stdout


# -- the name intake greets with --------------------------------------------------------------


class _EhloRecorder:
    def __init__(self) -> None:
        self.names: list[str] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        self.names.append(hostname)
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        return "250 2.0.0 OK"


def test_hostname_defaults_to_the_fqdn_and_greets_clients_and_the_relay(tmp_path: Path, monkeypatch, make_settings,
                                                                         start_intake_listener, config_file):
    unset = load_settings(_config(tmp_path, {'hostname = "localhost"\n': ""}, name="unset.toml"))
    assert unset.smtp.hostname is None and unset.hostname == socket.getfqdn()
    settings_module.machine_fqdn.cache_clear()
    for _ in range(3):  # looked up once, not per configuration load
        assert load_settings(_config(tmp_path, {'hostname = "localhost"\n': ""}, name="again.toml")).hostname
    assert settings_module.machine_fqdn.cache_info().misses == 1

    recorder = _EhloRecorder()
    relay_port = free_port()
    relay = Controller(recorder, hostname="127.0.0.1", port=relay_port)
    relay.start()
    try:
        settings = make_settings(INTAKE_SMTP__HOSTNAME="mx.vaixus.io", INTAKE_OUTBOUND__TRANSPORT="smtp",
                                 INTAKE_OUTBOUND__RELAY=f"127.0.0.1:{relay_port}")
        running = start_intake_listener(settings)
        with smtplib.SMTP("127.0.0.1", running.port, timeout=30) as client:
            code, greeting = client.ehlo("client.test")
            assert code == 250 and greeting.decode().splitlines()[0] == "mx.vaixus.io"
        smtp_send(running.port, report())
        process(settings, running.engine)
        assert deliver_outbox(settings, running.engine) == {"sent": 1}
        assert recorder.names == ["mx.vaixus.io"]
    finally:
        relay.stop()


# -- one configuration for the unit and the CLI ----------------------------------------------


def test_config_path_order_flag_environment_installed_then_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    installed = tmp_path / "etc" / "config.toml"
    monkeypatch.setattr(settings_module, "SYSTEM_CONFIG", installed)
    monkeypatch.chdir(tmp_path)
    assert settings_module.default_config_path() == Path("config.toml")  # nothing installed
    installed.parent.mkdir()
    installed.write_text("")
    assert settings_module.default_config_path() == installed
    monkeypatch.setenv("INTAKE_CONFIG", str(tmp_path / "mine.toml"))
    assert settings_module.default_config_path() == tmp_path / "mine.toml"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv(1) to run the CLI as another Unix account")
def test_an_outsider_without_config_flag_is_told_the_installed_config_is_the_groups(tmp_path: Path):
    # As `intake init` installs it: /etc/intake 0750 root:intake, so an outsider cannot even stat it.
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o750)
    installed = folder / "config.toml"
    installed.write_text("")
    tmp_path.chmod(0o755)
    nobody = pwd.getpwnam("nobody").pw_uid
    code = ("import sys; from pathlib import Path; from intake.config import settings; from intake.cli.app import main; "
            f"settings.SYSTEM_CONFIG = Path({str(installed)!r}); sys.argv = ['intake', 'tickets']; main()")
    outsider = subprocess.run(["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", "--",
                               sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env=_environment(), cwd="/")
    assert outsider.returncode == EXIT_CONFIG, outsider.stderr
    assert f"{installed}: permission denied; maintainers run intake as members of its group" in outsider.stderr


def test_only_upgrade_restore_and_serve_make_a_database(tmp_path: Path):
    config = _config(tmp_path, {'url = "sqlite:///var/intake.db"': 'url = "sqlite:///state/intake.db"'})
    database = tmp_path / "state" / "intake.db"
    for command in (["tickets"], ["show", "SEC-2026-0001"], ["backup", str(tmp_path / "b.db")], ["db", "current"]):
        result = _in_process("--config", str(config), *command)
        assert result.exit_code == EXIT_CONFIG, (command, result.output)
        assert (f"no database at {database} (from {config} [database] url): is this the service's configuration?"
                in result.stderr)
    by_env = _in_process("--config", str(config), "tickets",
                         INTAKE_DATABASE__URL=f"sqlite:///{tmp_path / 'other.db'}")
    assert "(from $INTAKE_DATABASE__URL)" in by_env.stderr
    assert not database.parent.exists() and not (tmp_path / "other.db").exists()

    upgraded = _in_process("--config", str(config), "db", "upgrade")
    assert upgraded.exit_code == 0 and f"creating a new database at {database}" in upgraded.stdout
    assert _in_process("--config", str(config), "tickets").stdout.strip() == "no tickets"


# -- who did it: the Unix account of the uid -------------------------------------------------


def test_actor_is_the_mapped_maintainer_else_the_unix_account_else_the_uid(tmp_path: Path):
    settings = load_settings(_config(tmp_path, {}, MAINTAINER.format(login="ana")))
    assert settings.actor("ana", 1000) == "Ana Maintainer"
    assert settings.actor("bo", 1001) == "unix:bo"
    assert settings.actor("intake", 998) == "unix:intake"  # the service's account is not intake itself
    assert settings.actor(None, 4242) == "uid:4242"


@pytest.mark.parametrize("name", ["intake", "Intake", "unix:ana", "uid:0"])
def test_no_maintainer_may_be_named_like_intake_or_an_unmapped_account(tmp_path: Path, name: str):
    with pytest.raises(ConfigError, match="maintainers.0.name"):
        load_settings(_config(tmp_path, {}, f'\n[[maintainers]]\nname = "{name}"\nemail = "x@vaixus.io"\n'))


def test_actor_comes_from_the_uid_not_user_or_logname(make_settings, start_intake_listener, config_file,
                                                      monkeypatch: pytest.MonkeyPatch):
    settings = make_settings()
    running = start_intake_listener(settings)
    smtp_send(running.port, report())
    [reference] = process(settings, running.engine).tickets_opened
    assert _in_process("--config", str(config_file), "label", reference, "unset-user").exit_code == 0
    assert _in_process("--config", str(config_file), "label", reference, "other-user", USER="mallory",
                       LOGNAME="mallory").exit_code == 0
    account = pwd.getpwuid(os.getuid()).pw_name
    actors = [e.actor for e in reads.ticket_detail(running.engine, reference).events if e.actor != "intake"]
    assert actors == [f"unix:{account}", f"unix:{account}"]


# -- a maintainer's own account in the service's group ---------------------------------------


def _unused(lookup, start: int) -> int:  # type: ignore[no-untyped-def]
    """The first id from *start* that *lookup* (grp.getgrgid, pwd.getpwuid) does not know."""
    for number in range(start, start + 1000):
        try:
            lookup(number)
        except KeyError:
            return number
    raise AssertionError("no unused id")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv(1) to run the CLI as another Unix account")
def test_a_maintainer_account_in_the_group_works_tickets_while_the_service_runs(make_settings, start_intake_listener):
    group = _unused(grp.getgrgid, 64000)
    nobody = pwd.getpwnam("nobody").pw_uid
    # As the unit's StateDirectory: root-owned here (the service's account), the group's, setgid.
    shared = Path(tempfile.mkdtemp(prefix="intake-group-"))
    try:
        os.chown(shared, 0, group)
        shared.chmod(0o2770)
        config = _config(shared, {'url = "sqlite:///var/intake.db"': f'url = "sqlite:///{shared}/intake.db"'},
                         MAINTAINER.format(login="nobody-else"))
        os.chown(config, 0, group)
        config.chmod(0o640)
        # "The service": the listener and processor of this test, running as root on that database.
        settings = make_settings(INTAKE_DATABASE__URL=f"sqlite:///{shared}/intake.db")
        running = start_intake_listener(settings)
        smtp_send(running.port, report())
        [reference] = process(settings, running.engine).tickets_opened
        for name in ("intake.db", "intake.db-wal", "intake.db-shm", "intake.db.writer"):
            found = (shared / name).stat()
            assert (stat.S_IMODE(found.st_mode), found.st_gid) == (0o660, group), name

        as_maintainer = ("setpriv", f"--reuid={nobody}", f"--regid={group}", f"--groups={group}", "--")
        listed = _intake("--config", str(config), "tickets", prefix=as_maintainer)
        assert listed.returncode == 0 and reference in listed.stdout, listed.stderr
        labelled = _intake("--config", str(config), "label", reference, "triaged", prefix=as_maintainer,
                           env=_environment(USER="ana", LOGNAME="ana"))
        assert labelled.returncode == 0, labelled.stderr
        no_name = _unused(pwd.getpwuid, 54000)
        unnamed = _intake("--config", str(config), "label", reference, "seen",
                          prefix=("setpriv", f"--reuid={no_name}", f"--regid={group}", f"--groups={group}", "--"))
        assert unnamed.returncode == 0, unnamed.stderr
        # Outside the group, even with a configuration it can read: told why, not a traceback.
        public = shared.with_name(f"{shared.name}-public.toml")
        public.write_text(config.read_text())
        public.chmod(0o644)
        outsider = _intake("--config", str(public), "tickets",
                           prefix=("setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", "--"))
        assert outsider.returncode == EXIT_CONFIG
        assert f"permission denied on {shared}; maintainers run intake as members of its group" in outsider.stderr

        events = reads.ticket_detail(running.engine, reference).events
        assert [(e.actor, e.detail.get("added")) for e in events if e.actor != "intake"] == [
            ("unix:nobody", ["triaged"]), (f"uid:{no_name}", ["seen"])]
    finally:
        shutil.rmtree(shared)
        shared.with_name(f"{shared.name}-public.toml").unlink(missing_ok=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder a group of its own")
def test_shared_files_take_their_folders_group_without_a_setgid_folder(tmp_path: Path):
    group = _unused(grp.getgrgid, 64000)
    folder = tmp_path / "state"
    folder.mkdir()
    os.chown(folder, 0, group)  # not setgid: a new file would get root's group
    private_files.create_shared_file(folder / "intake.db")
    found = (folder / "intake.db").stat()
    assert (stat.S_IMODE(found.st_mode), found.st_gid) == (0o660, group)
