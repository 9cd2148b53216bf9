"""Load and validate intake's configuration.

Sources, highest priority first:

1. environment variables ``INTAKE_<SECTION>__<KEY>`` (lists and tables as JSON),
2. the TOML file (``--config``, else ``$INTAKE_CONFIG``, else ``/etc/intake/config.toml`` if it
   exists, else ``./config.toml``): the service and a maintainer's ``intake`` read the same one,
3. the defaults of the section models (:mod:`intake.config.sections`).

Unknown or misspelled keys are errors, in the file and in ``INTAKE_*`` variables alike.
Secrets never live in the file: they come from ``$CREDENTIALS_DIRECTORY/<name>`` (systemd
``LoadCredential=``) or from an environment variable (see :func:`read_secret`).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import socket
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, get_origin

from pydantic import AfterValidator, BaseModel, Field, PrivateAttr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from intake import patterns
from intake.config import ConfigError
from intake.config.fetch import FetchSource, check_sources, token_files_exist
from intake.config.sections import (
    AdvisorySection, AutoReplySection, DatabaseSection, IntakeSection, LoggingSection, Maintainer, MetricsSection,
    OutboundSection, ProcessingSection, SenderAuthSection, ServiceSection, SmtpSection,
)
from intake.config.scheduler_section import SchedulerSection
from intake.config.data_protection import AuditSection, RetentionSection, StorageSection
from intake.config.disclosure_section import DisclosureSection
from intake.config.openpgp_section import OpenPgpSection
from intake.config.security_txt_section import SecurityTxtSection
from intake.language_tags import ENGLISH
from intake.send.localised import check_languages
from intake.sla.calendars import CalendarConfig, builtin_calendars
from intake.sla.engine import PolicyConfig, validate_policies
from intake.understand.quality import SHIPPED_RULES, RuleSet, RulesError, load_rules
from intake.vocabulary import UID_ACTOR_PREFIX, UNIX_ACTOR_PREFIX

ENV_PREFIX = "INTAKE_"
CONFIG_ENV = "INTAKE_CONFIG"
# Where an installed intake keeps its configuration (README "Running under systemd"): read when
# neither --config nor $INTAKE_CONFIG names one, so a maintainer's `intake` finds the service's.
SYSTEM_CONFIG = Path("/etc/intake/config.toml")
# Exit status for a configuration error (sysexits.h EX_CONFIG); systemd's
# RestartPreventExitStatus=78 stops a restart loop on a broken config.
EXIT_CONFIG = 78

# Secrets: credential file name -> environment variable that may carry it instead.
SECRETS = {
    "relay-password": "INTAKE_RELAY_PASSWORD",
    # Signs maintainers' reply addresses (see intake.understand.reply_tokens); the same on every node.
    "reply-secret": "INTAKE_REPLY_SECRET",
    # MACs the audit chain (see intake.store.audit); the same on every node and maintainer's intake.
    "audit-key": "INTAKE_AUDIT_KEY",
}


@functools.lru_cache(maxsize=8)  # keyed by the texts: a reloaded or copied Settings gets its own patterns
def _any_of(texts: tuple[str, ...]) -> patterns.Pattern | None:
    """One case-insensitive pattern that fully matches what any of *texts* fully matches (one RE2
    match per sender instead of one per pattern); None for no texts."""
    return patterns.compile("|".join(f"(?:{text})" for text in texts), ignorecase=True) if texts else None


class Settings(BaseSettings):
    """The whole validated configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    intake: IntakeSection = IntakeSection()
    smtp: SmtpSection = SmtpSection()
    database: DatabaseSection = DatabaseSection()
    storage: StorageSection = StorageSection()
    processing: ProcessingSection = ProcessingSection()
    outbound: OutboundSection = OutboundSection()
    service: ServiceSection = ServiceSection()
    logging: LoggingSection = LoggingSection()
    metrics: MetricsSection = MetricsSection()
    autoreply: AutoReplySection = AutoReplySection()
    sender_auth: SenderAuthSection = SenderAuthSection()
    scheduler: SchedulerSection = SchedulerSection()
    # How long content is kept: closed tickets', held messages', sent mail's (`intake purge`).
    retention: RetentionSection = RetentionSection()
    maintainers: list[Maintainer] = Field(default_factory=list)
    calendars: dict[str, CalendarConfig] = Field(default_factory=dict)
    policies: dict[str, PolicyConfig] = Field(default_factory=dict)
    # Publishing: security.txt and advisory drafts.
    security_txt: SecurityTxtSection = SecurityTxtSection()
    advisory: AdvisorySection = AdvisorySection()
    # The organisation's OpenPGP key: encrypted reports in, encrypted mail out (intake.openpgp).
    openpgp: OpenPgpSection = OpenPgpSection()
    # The key of the tamper-evident audit chain.
    audit: AuditSection = AuditSection()
    # Coordinated disclosure: the latest date agreed without --force (intake.tickets.disclosure).
    disclosure: DisclosureSection = DisclosureSection()
    # Hosted IMAP mailboxes to fetch mail from ([[fetch]] tables; intake.config.fetch).
    fetch: Annotated[list[FetchSource], AfterValidator(check_sources)] = Field(default_factory=list)

    # Where the file was read from; relative paths are resolved against its folder.
    config_path: Path | None = Field(default=None, exclude=True)
    _quality_rules: RuleSet = PrivateAttr()
    # What check-config and `intake serve` warn about: keys read under a name they no longer have.
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment over file: the file's content arrives as init arguments.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _policies_resolve(self) -> Settings:
        all_calendars = {**builtin_calendars(), **self.calendars}
        validate_policies(self.policies, all_calendars)
        known = set(self.policies)
        if self.intake.default_policy not in known:
            raise ValueError(
                f"intake.default_policy: {self.intake.default_policy!r} is not a configured policy "
                f"(known: {', '.join(sorted(known)) or 'none'})"
            )
        if unknown := set(self.disclosure.max_embargo_by_policy) - known:
            raise ValueError(f"disclosure.max_embargo_by_policy: unknown policies {', '.join(sorted(unknown))}")
        for address, policy in self.intake.policy_by_address.items():
            if policy not in known:
                raise ValueError(f"intake.policy_by_address.{address}: unknown policy {policy!r}")
        try:
            self._quality_rules = load_rules(self.resolve_path(self.intake.quality_rules)
                                             if self.intake.quality_rules else SHIPPED_RULES)
        except RulesError as exc:
            raise ValueError(f"intake.quality_rules: {exc}") from None
        token_files_exist(self.fetch, self.base_dir)
        check_languages(self.intake.languages, self.templates_path)
        return self

    @property
    def quality_rules(self) -> RuleSet:
        """The low-quality scoring rules, loaded (and checked) with the configuration."""
        return self._quality_rules

    @property
    def warnings(self) -> list[str]:
        """What loading the configuration found to warn about (old key names)."""
        return list(self._warnings)

    # -- derived values -------------------------------------------------------------

    @property
    def hostname(self) -> str:
        """Our name in the SMTP greeting, our EHLO and Received: headers: ``smtp.hostname``, else
        this machine's fully qualified name."""
        return self.smtp.hostname or machine_fqdn()

    @property
    def database_source(self) -> str:
        """Where the database URL came from, for messages: the variable or the file's key."""
        variable = _env_name("database", "url")
        return f"${variable}" if variable in os.environ else f"{self.config_path} [database] url"

    @property
    def base_dir(self) -> Path:
        return self.config_path.parent if self.config_path else Path.cwd()

    def resolve_path(self, path: Path) -> Path:
        return path if path.is_absolute() else self.base_dir / path

    @property
    def database_url(self) -> str:
        """The database URL with a relative SQLite path made absolute."""
        url = self.database.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite:///:memory:":
            return prefix + str(self.resolve_path(Path(url[len(prefix):])))
        return url

    @property
    def templates_path(self) -> Path | None:
        """The folder of templates overriding the shipped ones, if one is configured."""
        return self.resolve_path(self.intake.templates_dir) if self.intake.templates_dir else None

    def language_for(self, tag: str) -> str:
        """The language mail to a reporter whose ticket says *tag* is written in: *tag* while
        ``[intake] languages`` offers it, else English (a language the operator took back)."""
        return tag if tag in self.intake.languages else ENGLISH

    @property
    def maildir_path(self) -> Path:
        return self.resolve_path(self.outbound.maildir)

    @property
    def all_calendars(self) -> dict[str, CalendarConfig]:
        return {**builtin_calendars(), **self.calendars}

    def policy_for(self, recipient: str) -> str:
        """The policy for mail to *recipient*: an exact +tag mapping, then the base address."""
        address = recipient.lower()
        mapping = {k.lower(): v for k, v in self.intake.policy_by_address.items()}
        if address in mapping:
            return mapping[address]
        return mapping.get(base_address(address), self.intake.default_policy)

    @property
    def notice_recipients(self) -> list[str]:
        """Who gets new-ticket notices, reminders and breach notices."""
        return list(self.scheduler.recipients) or [m.email for m in self.maintainers]

    def digest_recipients(self, name: str) -> list[str]:
        return list(self.scheduler.digests[name].recipients) or [m.email for m in self.maintainers]

    def is_maintainer(self, address: str) -> bool:
        return address.lower() in {m.email.lower() for m in self.maintainers}

    def find_maintainer(self, who: str) -> Maintainer | None:
        """The maintainer *who* names: by email, name or login, else by the local part of their
        email if only one has it (case-insensitive)."""
        wanted = who.strip().lower()
        exact = [m for m in self.maintainers if wanted in (m.email.lower(), m.name.lower(), (m.login or "").lower())]
        by_local_part = [m for m in self.maintainers if m.email.lower().rpartition("@")[0] == wanted]
        found = exact or by_local_part
        return found[0] if len(found) == 1 else None

    def actor(self, login: str | None, uid: int) -> str:
        """Who a CLI change by Unix account *login* (None: the *uid* has no name) is recorded as:
        the maintainer with this ``login``, else ``unix:LOGIN`` (``uid:N``), never a name a
        maintainer or intake itself can have."""
        if login is None:
            return f"{UID_ACTOR_PREFIX}{uid}"
        maintainer = next((m for m in self.maintainers if m.login and m.login == login), None)
        return maintainer.name if maintainer else f"{UNIX_ACTOR_PREFIX}{login}"

    def never_answered(self, address: str) -> bool:
        """Senders no automatic mail goes to: MAILER-DAEMON, postmaster, noreply and friends."""
        local = address.rpartition("@")[0].lower()
        pattern = _any_of(tuple(self.autoreply.never_reply_to))
        return pattern is not None and pattern.fullmatch(local) is not None

    def our_address(self, recipient: str) -> str | None:
        """The configured address *recipient* is (or is a +tag form of), else None."""
        base = base_address(recipient)
        return base if base in self.smtp.addresses else None


@functools.cache
def machine_fqdn() -> str:
    """This machine's fully qualified name, looked up once per process (a resolver call per
    configuration load would slow every CLI command and test)."""
    return socket.getfqdn()


def base_address(address: str) -> str:
    """'Security+SEC-2026-0001@Example.com' -> 'security@example.com'."""
    local, _, domain = address.rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}".lower()


def _known_env_names(model: type[BaseModel], prefix: str) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        full = f"{prefix}{name.upper()}"
        names.add(full)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= _known_env_names(annotation, full + "__")
    return names


def _json_env_errors(environ: dict[str, str]) -> list[str]:
    """Variables that must hold JSON (lists, tables) but do not, each with the parser's reason."""
    errors = []
    for section_name, section in Settings.model_fields.items():
        model = section.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for key, field in model.model_fields.items():
            if get_origin(field.annotation) not in (list, dict):
                continue
            name = f"{ENV_PREFIX}{section_name.upper()}__{key.upper()}"
            if name in environ:
                try:
                    json.loads(environ[name])
                except json.JSONDecodeError as exc:
                    example = '["a", "b"]' if get_origin(field.annotation) is list else '{"key": "value"}'
                    errors.append(f"{name} ({section_name}.{key}): must be JSON, e.g. {example}: {exc}")
    return errors


def _unknown_env_vars(environ: dict[str, str]) -> list[str]:
    known = _known_env_names(Settings, ENV_PREFIX) | {CONFIG_ENV, *SECRETS.values()} | {
        _env_name(section, old) for section, old in RENAMED_KEYS}
    unknown = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        # Tables of named entries (policies, calendars) may be overridden below their name.
        if upper.startswith((f"{ENV_PREFIX}POLICIES__", f"{ENV_PREFIX}CALENDARS__")):
            continue
        unknown.append(name)
    return unknown


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key (misspelled, or not a setting intake has)"
    message = error["msg"].removeprefix("Value error, ")
    return f"{location}: {message}"


def default_config_path() -> Path:
    """$INTAKE_CONFIG, else the installed configuration if there is one, else ./config.toml."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    try:
        installed = SYSTEM_CONFIG.is_file()
    except PermissionError:  # /etc/intake is group intake's: load_settings says so to an outsider
        installed = True
    return SYSTEM_CONFIG if installed else Path("config.toml")


def load_settings(path: Path | None = None) -> Settings:
    """Read, merge and validate the configuration, or raise :class:`ConfigError`."""
    path = path or default_config_path()
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (use --config PATH or ${CONFIG_ENV})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied; maintainers run intake as members of its group") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None

    renamed = _read_renamed_keys(data, dict(os.environ))
    unknown = _unknown_env_vars(dict(os.environ))
    if unknown:
        raise ConfigError(
            "; ".join(f"{name}: unknown environment setting (misspelled?)" for name in sorted(unknown))
        )
    json_errors = _json_env_errors(dict(os.environ))
    if json_errors:
        raise ConfigError("\n".join(json_errors))
    for key in ("password", "relay_password"):
        if key in data.get("outbound", {}):
            raise ConfigError(
                f"outbound.{key}: secrets are not read from config.toml; put the relay password in "
                f"$CREDENTIALS_DIRECTORY/relay-password or ${SECRETS['relay-password']}"
            )
    try:
        settings = Settings(**data, config_path=Path(path).resolve())
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e) for e in exc.errors())) from None
    except ValueError as exc:  # validators raising outside pydantic's wrapping
        raise ConfigError(str(exc)) from None
    _check_listen_host(settings)
    _check_ca_file(settings)
    settings._warnings = renamed
    return settings


# (section, old key) -> new key: read under the old name with a warning, so an upgrade does not
# stop a service whose config.toml still says it.
RENAMED_KEYS = {("intake", "spam_rules"): "quality_rules"}


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}__{key}".upper()


def _read_renamed_keys(data: dict[str, Any], environ: dict[str, str]) -> list[str]:
    """Move keys of *data* from their old names to their new ones; one warning per key read under
    its old name, in the file or the environment."""
    warnings = []
    for (section, old), new in RENAMED_KEYS.items():
        table = data.get(section)
        if isinstance(table, dict) and old in table:
            if new in table:
                raise ConfigError(f"{section}.{old}: renamed {section}.{new}, which is set too; remove {old}")
            table[new] = table.pop(old)
            warnings.append(f"{section}.{old} is now called {section}.{new}: rename it in the config file")
        old_env, new_env = _env_name(section, old), _env_name(section, new)
        if old_env in environ:  # the section's field reads it under its old name too (sections.py)
            if new_env in environ:
                raise ConfigError(f"{old_env}: renamed {new_env}, which is set too; unset {old_env}")
            warnings.append(f"{old_env} is now called {new_env}: rename it in the environment")
    return warnings


def _check_listen_host(settings: Settings) -> None:
    host = settings.smtp.listen_address.host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"smtp.listen: {host!r} must be an IP address or 'localhost'") from None


def _check_ca_file(settings: Settings) -> None:
    if settings.outbound.ca_file is None:
        return
    path = settings.resolve_path(settings.outbound.ca_file)
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"outbound.ca_file: {path}: not a readable PEM file of CA certificates "
                          f"({getattr(exc, 'strerror', None) or exc})") from None


# The systemd credential holding the storage key when [storage] key_file is unset.
STORAGE_KEY_CREDENTIAL = "storage-key"


def read_secret(name: str, environ: dict[str, str] | None = None) -> str | None:
    """A secret from ``$CREDENTIALS_DIRECTORY/<name>``, else its environment variable, else None."""
    environ = os.environ if environ is None else environ
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").rstrip("\r\n")
    return environ.get(SECRETS[name])
