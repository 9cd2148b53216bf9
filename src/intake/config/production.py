"""What `intake check-config` and `intake serve` warn about: a configuration that loads but would
not work as a production service (placeholders, mail that never leaves, nobody to act on tickets,
a name relays refuse, a size limit below what researchers send). Warnings never stop intake.

The shipped development configuration (``[intake] development = true``) is spared all but the
size warning, which matters as much in development as anywhere.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from intake.config.sections import SmtpSection
from intake.config.settings import STORAGE_KEY_CREDENTIAL, Settings

# The default limit: a 25 MB attachment is ~33.3 MB after base64, plus headers.
RECOMMENDED_MESSAGE_SIZE: int = SmtpSection.model_fields["max_message_size"].default
# Domains reserved for examples and tests (RFC 2606, RFC 6761): no researcher's mail reaches them.
_EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net")
_RESERVED_TOP_LEVEL = ("example", "test", "invalid", "localhost")


def warnings(settings: Settings) -> list[str]:
    """Every warning about *settings*: keys under old names, then the checks of this module."""
    found = settings.warnings + _size_warnings(settings) + _token_warnings(settings)
    if not settings.intake.development:
        found += _placeholder_warnings(settings) + _transport_warnings(settings) + _maintainer_warnings(settings)
        found += _hostname_warnings(settings) + _storage_warnings(settings) + _retention_warnings(settings)
    return found


def _storage_warnings(settings: Settings) -> list[str]:
    """Report content in clear in the database and its backups: the policies promise otherwise."""
    if settings.storage.key_file or os.environ.get("CREDENTIALS_DIRECTORY") and \
            (Path(os.environ["CREDENTIALS_DIRECTORY"]) / STORAGE_KEY_CREDENTIAL).is_file():
        return []
    return ["no storage key: report content is stored unencrypted (set [storage] key_file to a key made by "
            "`intake storage keygen PATH`, or pass the 'storage-key' credential)"]


def is_placeholder_domain(domain: str) -> bool:
    """A domain reserved for documentation and tests (example.com, *.example, *.test, ...)."""
    name = domain.strip().rstrip(".").lower()
    return name.endswith(tuple(f".{d}" for d in _EXAMPLE_DOMAINS)) or name in _EXAMPLE_DOMAINS \
        or name.rpartition(".")[2] in _RESERVED_TOP_LEVEL


def is_fqdn(name: str) -> bool:
    """A name a relay with reject_non_fqdn_helo_hostname accepts and that is not localhost: a
    dotted domain name, not an address literal."""
    text = name.strip().rstrip(".").lower()
    try:
        ipaddress.ip_address(text.strip("[]"))
        return False
    except ValueError:
        pass
    return "." in text and text.partition(".")[0] != "localhost" and text.rpartition(".")[2] != "localhost"


def _size_warnings(settings: Settings) -> list[str]:
    size = settings.smtp.max_message_size
    if size >= RECOMMENDED_MESSAGE_SIZE:
        return []
    return [f"smtp.max_message_size is {size} bytes, below {RECOMMENDED_MESSAGE_SIZE} (35 MiB): a 25 MB "
            "attachment is ~33.3 MB once base64-encoded, with headers more; give the MX in front the same limit "
            "(Postfix message_size_limit, README \"Behind Postfix\"), or it bounces what intake refuses unseen"]


def _token_warnings(settings: Settings) -> list[str]:
    """An OAuth2 [[fetch]] source reading its token from the systemd credential: LoadCredential=
    copies the file once, when the service starts, so the refresher's new tokens never reach it."""
    return [f"fetch.{index}: source {source.name!r} reads its OAuth2 token from $CREDENTIALS_DIRECTORY/fetch-"
            f"{source.name}, which systemd's LoadCredential= copies once, at service start: a refreshed token "
            "reaches intake only at a restart (tokens last about an hour). Set token_file to the file your "
            "refresher writes" for index, source in enumerate(settings.fetch)
            if source.auth == "oauth2" and source.token_file is None]


def _placeholder_warnings(settings: Settings) -> list[str]:
    found = [f"smtp.addresses: {address} is a placeholder (a domain reserved for examples): put your own "
             "security address" for address in settings.smtp.addresses
             if is_placeholder_domain(address.rpartition("@")[2])]
    if is_placeholder_domain(settings.intake.message_id_domain):
        found.append(f"intake.message_id_domain: {settings.intake.message_id_domain} is a placeholder: put "
                     "your own domain (it ends the Message-IDs of mail intake sends)")
    return found


def _transport_warnings(settings: Settings) -> list[str]:
    if settings.outbound.transport != "maildir":
        return []
    return [f"[outbound] transport = \"maildir\": acknowledgements and replies are written to "
            f"{settings.maildir_path} and never reach researchers; set transport = \"smtp\" and relay"]


def _retention_warnings(settings: Settings) -> list[str]:
    kept = [name for name in ("after_close", "held", "sent_mail") if settings.retention.period(name) is None]
    if not kept:
        return []
    return [f"[retention] {', '.join(kept)} unset or \"never\": that content is kept forever, in the database "
            "and every backup (README \"Retention and deletion\")"]


def _maintainer_warnings(settings: Settings) -> list[str]:
    if settings.maintainers:
        return []
    return ["no [[maintainers]]: nobody gets new-ticket notices and reminders, and nobody's mail or "
            "command line is recognised as a maintainer's"]


def _hostname_warnings(settings: Settings) -> list[str]:
    name = settings.hostname
    if is_fqdn(name):
        return []
    origin = "smtp.hostname" if settings.smtp.hostname else "smtp.hostname is unset and this machine's name"
    return [f"{origin} is {name!r}, not a fully qualified domain name: intake greets clients and its relay "
            "with it, and relays with reject_non_fqdn_helo_hostname refuse it; set smtp.hostname to this "
            "host's name in DNS (the name its address resolves back to)"]
