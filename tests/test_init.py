"""`intake init`: a production config.toml from flags (or a terminal's answers), loaded by the same
loader as check-config, every shipped key and comment kept, placeholders refused, never overwritten
without --force, written 0640."""

from __future__ import annotations

import os
import pty
import re
import select
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SHIPPED_CONFIG
from intake.cli.app import main
from intake.config import template
from intake.config.settings import load_settings

INTAKE = Path(sys.executable).parent / "intake"
FLAGS = ["--domain", "acme.org", "--address", "security@acme.org", "--address", "psirt@acme.org",
         "--relay", "smtp.acme.org:587", "--maintainer", "ada=Ada Lovelace <ada@acme.org>",
         "--maintainer", "Bob Builder <bob@acme.org>", "--policy", "vectis-mail", "--hostname", "mx.acme.org"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("INTAKE_")]:
        monkeypatch.delenv(key)


def init(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, ["init", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_flags_make_a_production_config_that_loads(tmp_path: Path):
    path = tmp_path / "etc" / "config.toml"
    output = init(*FLAGS, "--state-dir", str(tmp_path / "state"), "--output", str(path))
    assert f"wrote {path}" in output
    settings = load_settings(path)
    assert settings.smtp.addresses == ["security@acme.org", "psirt@acme.org"]
    assert settings.smtp.hostname == "mx.acme.org"
    # Behind a local MTA by default, which is then the one trusted relay.
    assert settings.smtp.listen == "127.0.0.1:10025"
    assert [str(n) for n in settings.smtp.trusted_relays] == ["127.0.0.1/32"]
    assert (settings.outbound.transport, settings.outbound.relay) == ("smtp", "smtp.acme.org:587")
    assert settings.database_url == f"sqlite:///{tmp_path / 'state' / 'intake.db'}"
    assert settings.maildir_path == tmp_path / "state" / "outbox"
    assert settings.intake.default_policy == "vectis-mail"
    assert settings.intake.message_id_domain == "acme.org"
    assert not settings.intake.development
    assert [(m.name, m.email, m.login) for m in settings.maintainers] == [
        ("Ada Lovelace", "ada@acme.org", "ada"), ("Bob Builder", "bob@acme.org", None)]
    assert settings.actor("ada", 1000) == "Ada Lovelace"


def test_every_shipped_key_and_comment_is_kept_but_the_development_marker(tmp_path: Path):
    path = tmp_path / "config.toml"
    init(*FLAGS, "--output", str(path))
    shipped, written = SHIPPED_CONFIG.read_text().splitlines(), path.read_text().splitlines()
    development = next(i for i, line in enumerate(shipped) if line.startswith("development ="))
    shipped_comments = [line for line in shipped if line.startswith("#")]
    dropped = [line for line in shipped_comments if line not in written]
    # Only the marker's own comment, the lines right above it, went.
    assert dropped and dropped == shipped[development - len(dropped):development]
    assert "development" in " ".join(dropped)
    assert [line for line in written if line in shipped_comments] == [
        line for line in shipped_comments if line not in dropped]

    def keys(lines: list[str]) -> Counter[str]:
        return Counter(line.partition("=")[0].strip() for line in lines
                       if "=" in line and not line.startswith(("#", " ")))
    assert keys(shipped) - keys(written) == Counter(["development"])
    assert keys(written) - keys(shipped) == Counter(["name", "name", "email", "email", "login"])


def test_the_file_is_0640_in_group_intake_if_there_is_one_and_never_overwritten_without_force(tmp_path: Path):
    path = tmp_path / "config.toml"
    init(*FLAGS, "--output", str(path))
    status = path.stat()
    assert stat.S_IMODE(status.st_mode) == 0o640
    group = template.config_group()
    may_give = group is not None and (os.geteuid() == 0 or group in os.getgroups())
    assert status.st_gid == (group if may_give else os.getegid())
    before = path.read_bytes()
    assert "exists (use --force to overwrite)" in init(*FLAGS, "--domain", "other.org", "--output", str(path), code=1)
    assert path.read_bytes() == before
    init(*[f if f != "acme.org" else "other.org" for f in FLAGS], "--output", str(path), "--force")
    assert load_settings(path).intake.message_id_domain == "other.org"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]  # no temporary file left


@pytest.mark.parametrize("flag, value", [
    ("--domain", "example.com"), ("--domain", "mail.example.org"), ("--address", "security@acme.test"),
    ("--maintainer", "Ana <ana@example.net>"), ("--hostname", "mx.example"), ("--relay", "relay.invalid:25"),
])
def test_placeholder_domains_are_refused(tmp_path: Path, flag: str, value: str):
    path = tmp_path / "config.toml"
    flags = list(FLAGS)
    if flag in ("--domain", "--hostname", "--relay"):
        flags[flags.index(flag) + 1] = value
    else:
        flags[flags.index(flag):flags.index(flag) + 2] = [flag, value]
    output = init(*flags, "--output", str(path), code=2)
    assert f"{flag}: " in output and "placeholder" in output
    assert not path.exists()


def test_without_a_terminal_a_missing_answer_is_a_usage_error(tmp_path: Path):
    path = str(tmp_path / "c.toml")
    assert "--domain is missing" in init(*FLAGS[2:], "--output", path, code=2)
    people = FLAGS.index("--maintainer")
    no_people = FLAGS[:people] + FLAGS[people + 4:]
    assert "--maintainer is missing" in init(*no_people, "--output", path, code=2)
    assert "'nope' is not one of" in init(*FLAGS, "--policy", "nope", "--output", path, code=2)
    assert not (tmp_path / "c.toml").exists()


def test_the_reply_secret_credential_is_made_once(tmp_path: Path):
    credentials = tmp_path / "credentials"
    init(*FLAGS, "--output", str(tmp_path / "a.toml"), "--credentials-dir", str(credentials))
    secret = credentials / "reply-secret"
    assert (stat.S_IMODE(credentials.stat().st_mode), stat.S_IMODE(secret.stat().st_mode)) == (0o700, 0o600)
    first = secret.read_bytes()
    assert len(first.strip()) == 44  # 32 random bytes, base64
    assert "kept the existing" in init(*FLAGS, "--output", str(tmp_path / "b.toml"), "--credentials-dir",
                                       str(credentials))
    assert secret.read_bytes() == first


def test_on_a_terminal_missing_answers_are_asked_and_bad_ones_asked_again(tmp_path: Path):
    """A real terminal (a pty): the questions, a placeholder refused and asked again, defaults taken."""
    path = tmp_path / "config.toml"
    answers = iter(["example.com", "acme.org", "", "emailconnect", "", "0.0.0.0:25", "mx.acme.org",
                    "Bob <bob@example.org>", "bob=Bob Builder <bob@acme.org>", ""])
    primary, secondary = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    process = subprocess.Popen([str(INTAKE), "init", "--output", str(path)], stdin=secondary, stdout=secondary,
                               stderr=secondary, env=environment, close_fds=True)
    os.close(secondary)
    screen, answered_at = b"", 0
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the child closed the terminal
                break
            screen += chunk
            if screen[answered_at:].endswith(b": "):  # a question (click ends each with ": ")
                os.write(primary, next(answers).encode() + b"\n")
                answered_at = len(screen)
    finally:
        os.close(primary)
        process.wait(timeout=10)
    text = screen.decode(errors="replace")
    assert process.returncode == 0, text
    assert text.count("placeholder") == 2  # example.com, then a maintainer at example.org: asked again
    settings = load_settings(path)
    assert settings.smtp.addresses == ["security@acme.org"]  # the default, taken with Enter
    assert (settings.outbound.relay, settings.smtp.listen, settings.intake.default_policy) == (
        "127.0.0.1:25", "0.0.0.0:25", "emailconnect")
    assert settings.smtp.trusted_relays == []  # not behind an MTA: nobody's XFORWARD is believed
    assert [(m.name, m.login) for m in settings.maintainers] == [("Bob Builder", "bob")]


def test_the_readme_walk_through_documents_every_flag_and_no_other():
    readme = (SHIPPED_CONFIG.parent / "README.md").read_text()
    section = readme[readme.index("## Installing on a Debian server"):readme.index("## Running under systemd")]
    command = main.get_command(None, "init")  # type: ignore[arg-type]
    flags = {name for option in command.params for name in option.opts if name.startswith("--")}
    global_flags = {name for option in main.params for name in option.opts}
    documented = set(re.findall(r"`(--[a-z][a-z-]*)", section))
    assert flags <= documented
    assert documented <= flags | global_flags
