"""The shipped config.toml as the template of a production configuration (`intake init`).

The shipped ``config.toml`` (packaged as ``shipped.toml``) documents every key; a production file
is that text with the operator's answers in place of the shipped values, every comment kept, the
``development`` marker and its comment taken out and the maintainers added. Nothing here reads the
terminal: :mod:`intake.cli.setup` asks the questions.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import re  # config text and operator input only
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from intake.config.production import is_placeholder_domain
from intake.store.private_files import give_group, write_new_file

# RFC 2606 / RFC 6761 names that can never be a real organisation's.
PLACEHOLDER_HINT = "example.com/.org/.net, *.example, *.test, *.invalid and *.localhost are placeholders"

CONFIG_MODE = 0o640
CONFIG_GROUP = "intake"

# A Unix login as useradd accepts it by default, then "=", then "Name <email>".
_MAINTAINER = re.compile(r"(?:(?P<login>[a-z_][a-z0-9_.-]*\$?)=)?(?P<name>[^<>=]*[^<>=\s])\s*<(?P<email>[^<>\s]+)>")
_TABLE = re.compile(r"\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?\s*(#.*)?$")
# A key line, set or commented out ("# quality_rules = ...").
_KEY_LINE = re.compile(r"#?\s*[A-Za-z_][\w-]*\s*=")


class AnswerError(ValueError):
    """An answer that cannot go into a production configuration; the message says why."""


@dataclass(frozen=True)
class MaintainerAnswer:
    name: str
    email: str
    login: str | None


@dataclass(frozen=True)
class Answers:
    """What the operator chose: everything ``intake init`` puts into the file."""

    domain: str
    addresses: list[str]
    relay: str
    maintainers: list[MaintainerAnswer]
    policy: str
    listen: str
    hostname: str
    trusted_relays: list[str]
    state_dir: Path
    from_name: str


def shipped_text() -> str:
    """The shipped config.toml, as installed with the package."""
    return resources.files("intake.config").joinpath("shipped.toml").read_text(encoding="utf-8")


def shipped_policies() -> list[str]:
    return sorted(tomllib.loads(shipped_text())["policies"])


def parse_maintainer(text: str) -> MaintainerAnswer:
    """``[LOGIN=]Name <email>``, e.g. ``ada=Ada Lovelace <ada@example.org>``."""
    found = _MAINTAINER.fullmatch(text.strip())
    if not found or "@" not in found["email"]:
        raise AnswerError(f"maintainer {text!r}: expected '[LOGIN=]Name <email>', "
                          "e.g. 'ada=Ada Lovelace <ada@your-domain>'")
    return MaintainerAnswer(found["name"], found["email"], found["login"])


def placeholders(answers: Answers) -> list[str]:
    """Each answer that names a placeholder domain, as ``--flag value``."""
    named = [("--domain", answers.domain, answers.domain), ("--hostname", answers.hostname, answers.hostname),
             ("--relay", answers.relay, answers.relay.rpartition(":")[0])]
    named += [("--address", a, a.rpartition("@")[2]) for a in answers.addresses]
    named += [("--maintainer", f"{m.name} <{m.email}>", m.email.rpartition("@")[2]) for m in answers.maintainers]
    return [f"{flag} {value}" for flag, value, domain in named if is_placeholder_domain(domain)]


def is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _toml(value: str | list[str]) -> str:
    # JSON strings are TOML basic strings (same escapes), and a JSON list of them a TOML array.
    return json.dumps(value, ensure_ascii=False)


def render(shipped: str, answers: Answers) -> str:
    """The shipped text with *answers* in place; raises :class:`AnswerError` (naming the key) if the
    shipped text lacks a key it sets."""
    values = {
        ("intake", "message_id_domain"): answers.domain,
        ("intake", "from_name"): answers.from_name,
        ("intake", "default_policy"): answers.policy,
        ("smtp", "listen"): answers.listen,
        ("smtp", "addresses"): answers.addresses,
        ("smtp", "hostname"): answers.hostname,
        ("smtp", "trusted_relays"): answers.trusted_relays,
        ("database", "url"): f"sqlite:///{answers.state_dir / 'intake.db'}",
        ("outbound", "transport"): "smtp",
        ("outbound", "relay"): answers.relay,
        ("outbound", "maildir"): str(answers.state_dir / "outbox"),
    }
    lines = shipped.splitlines()
    out: list[str] = []
    table = ""
    done: set[tuple[str, str]] = set()
    for line in lines:
        header = _TABLE.match(line)
        if header:
            table = header[1]
        key = line.partition("=")[0].strip() if "=" in line and not line.startswith("#") else ""
        if (table, key) == ("intake", "development"):
            _drop_own_comment(out)
            continue
        if (table, key) in values:
            out.append(f"{key} = {_toml(values[table, key])}")
            done.add((table, key))
            continue
        out.append(line)
    out.insert(1, "# Written by `intake init`: a production configuration. Change it freely; "
                  "`intake check-config` checks it.")
    missing = [f"{table}.{key}" for table, key in values if (table, key) not in done]
    if missing:
        raise AnswerError(f"the shipped config.toml has no {', '.join(missing)}")
    return _add_maintainers("\n".join(out) + "\n", answers.maintainers)


def _drop_own_comment(out: list[str]) -> None:
    """Take off the end of *out* the comment lines above a key, back to the previous key (set or
    commented out) or blank line."""
    while out and out[-1].startswith("#") and not _KEY_LINE.match(out[-1]) and out[-1].strip() != "#":
        out.pop()


def _add_maintainers(text: str, maintainers: list[MaintainerAnswer]) -> str:
    """Each maintainer as a ``[[maintainers]]`` table after the commented example of one."""
    example = re.search(r"^# \[\[maintainers\]\]\n(?:#.*\n)*", text, re.MULTILINE)
    if example is None:
        raise AnswerError("the shipped config.toml has no commented [[maintainers]] example")
    tables = "".join(
        f"\n[[maintainers]]\nname = {_toml(m.name)}\nemail = {_toml(m.email)}\n"
        + (f"login = {_toml(m.login)}\n" if m.login else "")
        for m in maintainers)
    return text[:example.end()] + tables + text[example.end():]


def config_group() -> int | None:
    """The gid of group ``intake``, if the system has one."""
    try:
        return grp.getgrnam(CONFIG_GROUP).gr_gid
    except KeyError:
        return None


def write_config(path: Path, text: str, *, replace: bool, group: int | None) -> bool:
    """Write *text* to *path*, mode 0640, all at once (:func:`write_new_file`): renamed over
    *path* when *replace*, else linked (:class:`FileExistsError` if *path* exists). The file (and
    its folder, made 0750 if missing) is given *group* where the writer may do that (root, or a
    member of it); returns whether it was."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o750, parents=True)
        os.chmod(path.parent, 0o750)
        if group is not None:
            give_group(path.parent, group)
    return write_new_file(path, text.encode(), replace=replace, mode=CONFIG_MODE, group=group)
