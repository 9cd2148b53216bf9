"""``intake init``: write a production config.toml from flags, asking on a terminal for what is
missing, then say what is left to do (the reply secret, the unit, DNS)."""

from __future__ import annotations

import base64
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from intake.cli.common import Context, fail
from intake.config import template
from intake.config.production import is_placeholder_domain
from intake.config.template import AnswerError, Answers, MaintainerAnswer
from intake.display import echo

DEFAULT_OUTPUT = Path("/etc/intake/config.toml")
DEFAULT_RELAY = "127.0.0.1:25"
BEHIND_MTA = "127.0.0.1:10025"
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?")


def _domain(text: str) -> str:
    name = text.strip().rstrip(".").lower()
    if not _DOMAIN.fullmatch(name):
        raise click.BadParameter(f"{text!r} is not a fully qualified domain name")
    if is_placeholder_domain(name):
        raise click.BadParameter(f"{name}: {template.PLACEHOLDER_HINT}; give your organisation's own")
    return name


def _addresses(text: str) -> list[str]:
    found = [a.strip() for a in text.split(",") if a.strip()]
    for address in found:
        local, _, domain = address.rpartition("@")
        if not local:
            raise click.BadParameter(f"{address!r} is not an email address")
        _domain(domain)
    return found


def _maintainer(text: str) -> MaintainerAnswer:
    try:
        found = template.parse_maintainer(text)
    except AnswerError as exc:
        raise click.BadParameter(str(exc)) from None
    _domain(found.email.rpartition("@")[2])
    return found


def _host_port(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"{text!r}: expected HOST:PORT")
    name = host.strip("[]").lower()
    if name != "localhost" and is_placeholder_domain(name):  # a local relay is named localhost
        raise click.BadParameter(f"{host}: {template.PLACEHOLDER_HINT}")
    return text.strip()


class _Asker:
    """A flag's value checked, else a question on the terminal (asked again until the answer is
    good), else the default; without a terminal and without a default: exit 2 naming the flag."""

    def __init__(self, interactive: bool):
        self.interactive = interactive

    def __call__(self, flag: str, given: str | None, question: str, check: Callable[[str], object],
                 default: str | None = None) -> str:
        if given is not None:
            try:
                check(given)
            except click.BadParameter as exc:
                fail(f"{flag}: {exc.message}", 2)
            return given
        if self.interactive:
            answer: str = click.prompt(question, default=default, value_proc=lambda text: _checked(check, text))
            return answer
        if default is None:
            fail(f"{flag} is missing, and there is no terminal to ask on", 2)
        return default


def _checked(check: Callable[[str], object], text: str) -> str:
    check(text)
    return text


def _machine_name() -> str | None:
    """This machine's fully qualified name, if it has one."""
    name = socket.getfqdn()
    try:
        return _domain(name)
    except click.BadParameter:
        return None


@click.command("init")
@click.option("--domain", help="Your organisation's mail domain (Message-IDs, the default address).")
@click.option("--address", "addresses", multiple=True, help="An address mail is accepted for "
              "(repeat for more; default security@DOMAIN).")
@click.option("--relay", help=f"HOST:PORT intake sends its mail through (default {DEFAULT_RELAY}, a local MTA).")
@click.option("--maintainer", "maintainers", multiple=True, metavar="'[LOGIN=]NAME <EMAIL>'",
              help="A maintainer, with the Unix login they run `intake` as, e.g. "
                   "'ada=Ada Lovelace <ada@your-domain>' (repeat for more).")
@click.option("--policy", help="The SLA policy tickets get (one of the shipped ones).")
@click.option("--listen", help=f"HOST:PORT intake listens on: {BEHIND_MTA} (default) behind a local MTA, "
                               "or 0.0.0.0:25 as the MX itself (systemd's socket).")
@click.option("--hostname", help="Name in intake's greeting and HELO (default: this machine's FQDN).")
@click.option("--trusted-relay", "trusted_relays", multiple=True,
              help="Address or network of an MTA handing mail to intake (repeat; default 127.0.0.1 when "
                   "listening on loopback, none otherwise).")
@click.option("--from-name", help="Display name on mail intake sends (default 'DOMAIN Security Team').")
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("/var/lib/intake"), show_default=True,
              help="Where the service keeps its SQLite database (intake.db) and Maildir.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help=f"The file to write (default: --config, else {DEFAULT_OUTPUT}).")
@click.option("--credentials-dir", type=click.Path(path_type=Path), default=None,
              help="Also create the reply-secret credential there (kept if it exists), e.g. /etc/intake/credentials.")
@click.option("--force", is_flag=True, help="Replace the file if it exists.")
@click.pass_obj
def init(obj: Context, domain: str | None, addresses: tuple[str, ...], relay: str | None,
         maintainers: tuple[str, ...], policy: str | None, listen: str | None, hostname: str | None,
         trusted_relays: tuple[str, ...], from_name: str | None, state_dir: Path, output: Path | None,
         credentials_dir: Path | None, force: bool) -> None:
    """Write a production config.toml (mode 0640, group intake) from these flags, asking on a
    terminal for what is missing; placeholder domains (example.com, *.test, ...) are refused."""
    path = output or obj.config_path or DEFAULT_OUTPUT
    if path.exists() and not force:
        fail(f"{path} exists (use --force to overwrite)")
    if not state_dir.is_absolute():
        fail(f"--state-dir {state_dir}: give an absolute path", 2)
    ask = _Asker(sys.stdin.isatty())
    domain = _domain(ask("--domain", domain, "Mail domain", _domain))
    accepted = _addresses(ask("--address", ",".join(addresses) or None, "Addresses mail is accepted for "
                              "(comma-separated)", _addresses, f"security@{domain}"))
    policies = template.shipped_policies()
    policy = ask("--policy", policy, f"SLA policy ({', '.join(policies)})", _one_of(policies))
    relay = ask("--relay", relay, "Relay for outgoing mail (HOST:PORT)", _host_port, DEFAULT_RELAY)
    listen = ask("--listen", listen, f"Listen on ({BEHIND_MTA} behind a local MTA, 0.0.0.0:25 as the MX)",
                 _host_port, BEHIND_MTA)
    hostname = _domain(ask("--hostname", hostname, "Host name for the greeting and HELO", _domain, _machine_name()))
    people = [_maintainer_or_fail(text) for text in maintainers] or _ask_maintainers(ask.interactive)
    answers = Answers(
        domain=domain, addresses=accepted, relay=relay, maintainers=people, policy=policy, listen=listen,
        hostname=hostname, state_dir=state_dir, from_name=from_name or f"{domain} Security Team",
        trusted_relays=list(trusted_relays) or _local_mta(listen))
    refused = template.placeholders(answers)
    if refused:
        fail(f"placeholder domains ({template.PLACEHOLDER_HINT}): {'; '.join(refused)}", 2)
    try:
        text = template.render(template.shipped_text(), answers)
    except AnswerError as exc:
        fail(str(exc))
    _validate(text)
    try:
        grouped = template.write_config(path, text, replace=force, group=template.config_group())
    except FileExistsError:
        fail(f"{path} exists (use --force to overwrite)")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")
    echo(f"wrote {path} (mode 0640{', group intake' if grouped else ''})")
    if credentials_dir is not None:
        _reply_secret(credentials_dir)
    _next_steps(path, answers, credentials_dir)


def _local_mta(listen: str) -> list[str]:
    """Listening on loopback, intake is behind an MTA on this host, which connects from loopback."""
    if not template.is_loopback(listen):
        return []
    return ["::1" if ":" in listen.rpartition(":")[0] else "127.0.0.1"]


def _one_of(choices: list[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text not in choices:
            raise click.BadParameter(f"{text!r} is not one of {', '.join(choices)}")
        return text
    return check


def _maintainer_or_fail(text: str) -> MaintainerAnswer:
    try:
        return _maintainer(text)
    except click.BadParameter as exc:
        fail(f"--maintainer: {exc.message}", 2)


def _ask_maintainers(interactive: bool) -> list[MaintainerAnswer]:
    """At least one maintainer, asked for one per line until an empty line."""
    if not interactive:
        fail("--maintainer is missing (at least one), and there is no terminal to ask on", 2)
    people: list[MaintainerAnswer] = []
    while True:
        question = "Maintainer as [LOGIN=]Name <email>" + ("; empty line when done" if people else "")
        text: str = click.prompt(question, default="" if people else None, show_default=False,
                                 value_proc=lambda t: _checked(_maintainer, t) if t.strip() else t)
        if not text.strip():
            return people
        people.append(_maintainer(text))


def _validate(text: str) -> None:
    """Load *text* as check-config would (every check, and the INTAKE_* environment); exit 2 if it fails."""
    from intake.config.settings import ConfigError, load_settings

    with tempfile.TemporaryDirectory() as folder:
        candidate = Path(folder) / "config.toml"
        candidate.write_text(text, encoding="utf-8")
        try:
            load_settings(candidate)
        except ConfigError as exc:
            fail(f"the configuration these answers make does not load, nothing written:\n{exc}", 2)


def _reply_secret(folder: Path) -> None:
    from intake.store import private_files

    private_files.private_directory(folder)
    path = folder / "reply-secret"
    try:
        private_files.write_private(path, base64.b64encode(os.urandom(32)) + b"\n", replace=False)
    except FileExistsError:
        echo(f"kept the existing {path}")
        return
    echo(f"wrote {path} (mode 0600): the secret signing maintainers' reply addresses")


def _next_steps(path: Path, answers: Answers, credentials_dir: Path | None) -> None:
    """What is left, as numbered steps with their commands (README: Installing on a Debian server)."""
    intake = f"intake --config {path}" if path != DEFAULT_OUTPUT else "intake"
    host, _, port = answers.listen.rpartition(":")
    steps = [] if credentials_dir else [[
        "The secret signing maintainers' reply addresses (the unit's LoadCredential=reply-secret):",
        "sudo install -d -m 0700 /etc/intake/credentials",
        "sudo install -m 0600 /dev/null /etc/intake/credentials/reply-secret",
        "head -c 32 /dev/urandom | base64 | sudo tee /etc/intake/credentials/reply-secret >/dev/null"]]
    steps.append(["Check it as the service's user:", f"sudo -u intake {intake} check-config"])
    if template.is_loopback(answers.listen):
        steps.append([f"intake.socket listens on port 25; behind your MTA it must listen on {answers.listen}: "
                      "`sudo systemctl edit intake.socket`, and write", "[Socket]", "ListenStream=",
                      f"ListenStream={answers.listen}",
                      f"Have the MTA hand mail for {', '.join(answers.addresses)} to intake:[{host}]:{port}, "
                      "its own transport, STARTTLS required (README: Behind Postfix): give intake a "
                      "certificate, tls_certificate and tls_key (README: step 6)."])
    else:
        steps.append([f"The MX record of {answers.domain} must name {answers.hostname} (README: Installing on a "
                      "Debian server)."])
    steps.append(["Start it:",
                  "sudo cp /opt/intake/systemd/intake.service /opt/intake/systemd/intake.socket /etc/systemd/system/",
                  "sudo systemctl daemon-reload && sudo systemctl enable --now intake.socket intake.service"])
    lines = ["", "Next steps:"]
    for number, (first, *commands) in enumerate(steps, 1):
        lines += [f"{number}. {first}", *(f"     {command}" for command in commands)]
    echo("\n".join(lines))
