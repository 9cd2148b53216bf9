"""Configuration contract: file + INTAKE_* overrides, strict keys, secrets outside the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHIPPED_CONFIG
from intake.config.settings import EXIT_CONFIG, SYSTEM_CONFIG, ConfigError, load_settings, read_secret

INTAKE = Path(sys.executable).parent / "intake"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("INTAKE_") or k == "CREDENTIALS_DIRECTORY"]:
        monkeypatch.delenv(key)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _check_config(config: Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")} | env
    return subprocess.run([str(INTAKE), "--config", str(config), "check-config"], capture_output=True, text=True,
                          env=environment, cwd=cwd)


def test_shipped_config_is_valid_and_ships_the_three_policies():
    settings = load_settings(SHIPPED_CONFIG)
    assert set(settings.policies) == {"vaixus", "vectis-mail", "emailconnect"}
    assert settings.intake.default_policy in settings.policies
    assert settings.outbound.transport == "maildir"
    assert settings.database_url == f"sqlite:///{SHIPPED_CONFIG.parent / 'var' / 'intake.db'}"
    assert settings.smtp.listen_address.host == "127.0.0.1"
    assert _check_config(SHIPPED_CONFIG).returncode == 0


def test_environment_overrides_every_named_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("INTAKE_SMTP__LISTEN", "[::1]:2525")
    monkeypatch.setenv("INTAKE_SMTP__ADDRESSES", '["security@example.org", "psirt@example.org"]')
    monkeypatch.setenv("INTAKE_DATABASE__URL", "postgresql+psycopg://intake@db.internal/intake")
    monkeypatch.setenv("INTAKE_OUTBOUND__TRANSPORT", "smtp")
    monkeypatch.setenv("INTAKE_OUTBOUND__RELAY", "relay.internal:587")
    monkeypatch.setenv("INTAKE_OUTBOUND__MAILDIR", str(tmp_path / "mail"))
    monkeypatch.setenv("INTAKE_INTAKE__DEFAULT_POLICY", "vectis-mail")
    settings = load_settings(SHIPPED_CONFIG)
    assert (settings.smtp.listen_address.host, settings.smtp.listen_address.port) == ("::1", 2525)
    assert settings.smtp.addresses == ["security@example.org", "psirt@example.org"]
    assert settings.database_url == "postgresql+psycopg://intake@db.internal/intake"
    assert settings.outbound.transport == "smtp"
    assert (settings.outbound.relay_address.host, settings.outbound.relay_address.port) == ("relay.internal", 587)
    assert settings.maildir_path == tmp_path / "mail"
    assert settings.intake.default_policy == "vectis-mail"
    # Keys not overridden keep the file's values.
    assert settings.smtp.max_recipients == 20


@pytest.mark.parametrize("text, names", [
    ('[smtp]\nlisn = "127.0.0.1:25"\n', ["smtp.lisn", "unknown key"]),
    ('[smpt]\nlisten = "127.0.0.1:25"\n', ["smpt", "unknown key"]),
    ('[smtp]\nlisten = "nonsense"\n', ["smtp.listen", "host:port"]),
    ('[smtp]\nlisten = "127.0.0.1:99999"\n', ["smtp.listen", "out of range"]),
    ('[outbound]\ntransport = "pigeon"\n', ["outbound.transport", "smtp", "maildir"]),
    ('[smtp]\naddresses = ["not-an-address"]\n', ["smtp.addresses", "not an email address"]),
    ('[smtp]\naddresses = []\n', ["smtp.addresses"]),
    ('[smtp]\nmax_message_size = -1\n', ["smtp.max_message_size"]),
    ('[smtp]\ntls_certificate = "cert.pem"\n', ["tls_certificate and tls_key"]),
    ('[smtp]\nmax_connections = 10\nmax_connections_per_ip = 11\n', ["max_connections_per_ip"]),
    ('[smtp]\nmax_connections = 0\n', ["max_connections"]),
    ('[smtp]\nmax_connections_per_network = 10\n', ["max_connections_per_network", "max_connections_per_ip"]),
    ('[smtp]\nmax_connections_per_network = 201\n', ["max_connections_per_network", "max_connections (200)"]),
    ('[smtp]\nnetwork_prefix_ipv4 = 33\n', ["smtp.network_prefix_ipv4"]),
    ('[smtp]\nnetwork_prefix_ipv6 = 129\n', ["smtp.network_prefix_ipv6"]),
    ('[smtp]\nstore_timeout = 0\n', ["smtp.store_timeout"]),
    ('[smtp]\nstore_timeout = 600\n', ["smtp.store_timeout", "600"]),  # RFC 5321: the client waits 10 minutes
    ('[intake]\ndefault_policy = "nope"\n', ["default_policy", "nope"]),
    ('[outbound]\npassword = "hunter2"\n', ["outbound.password", "relay-password"]),
    # A relay login without STARTTLS would send AUTH PLAIN in clear.
    ('[outbound]\nusername = "intake"\n', ["outbound.username", "outbound.starttls", "in clear"]),
    ('[outbound]\nusername = "intake"\nstarttls = false\ntransport = "smtp"\n',
     ["outbound.username", "outbound.starttls"]),
    ('[smtp\n', ["not valid TOML"]),
])
def test_bad_config_exits_78_naming_the_key(tmp_path: Path, text: str, names: list[str]):
    base = SHIPPED_CONFIG.read_text()
    # Merge the bad fragment into the shipped file: replace a whole section where it exists.
    config = _write(tmp_path, base + "\n" + text if text.split("]")[0].strip("[\n") not in base else text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    for name in names:
        assert name in str(raised.value)
    result = _check_config(config)
    assert result.returncode == EXIT_CONFIG
    for name in names:
        assert name in result.stderr


def test_relay_credentials_without_starttls_are_refused_by_serve_and_from_the_environment(tmp_path: Path):
    result = _check_config(SHIPPED_CONFIG, INTAKE_OUTBOUND__USERNAME="intake")
    assert result.returncode == EXIT_CONFIG
    assert "outbound.username" in result.stderr and "outbound.starttls" in result.stderr
    serve = subprocess.run([str(INTAKE), "--config", str(SHIPPED_CONFIG), "serve"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
                           | {"INTAKE_OUTBOUND__USERNAME": "intake"}, timeout=60)
    assert serve.returncode == EXIT_CONFIG
    assert "outbound.starttls" in serve.stderr
    assert _check_config(SHIPPED_CONFIG, INTAKE_OUTBOUND__USERNAME="intake",
                         INTAKE_OUTBOUND__STARTTLS="true").returncode == 0


def test_ca_file_is_relative_to_the_config_file_and_must_be_a_pem_file(tmp_path: Path):
    import trustme

    config = _write(tmp_path, SHIPPED_CONFIG.read_text().replace('# ca_file = "/etc/intake/relay-ca.pem"',
                                                                 'ca_file = "relay-ca.pem"'))
    with pytest.raises(ConfigError, match=r"outbound\.ca_file: .*relay-ca\.pem"):
        load_settings(config)
    (tmp_path / "relay-ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"outbound\.ca_file"):
        load_settings(config)
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "relay-ca.pem"))
    settings = load_settings(config)
    assert settings.resolve_path(settings.outbound.ca_file) == tmp_path / "relay-ca.pem"


def test_the_network_connection_limit_defaults_within_the_other_two(monkeypatch: pytest.MonkeyPatch):
    assert load_settings(SHIPPED_CONFIG).smtp.max_connections_per_network == 100
    monkeypatch.setenv("INTAKE_SMTP__MAX_CONNECTIONS", "20")
    monkeypatch.setenv("INTAKE_SMTP__MAX_CONNECTIONS_PER_IP", "5")
    assert load_settings(SHIPPED_CONFIG).smtp.max_connections_per_network == 20
    monkeypatch.setenv("INTAKE_SMTP__MAX_CONNECTIONS", "1000")
    monkeypatch.setenv("INTAKE_SMTP__MAX_CONNECTIONS_PER_IP", "150")
    assert load_settings(SHIPPED_CONFIG).smtp.max_connections_per_network == 150
    monkeypatch.setenv("INTAKE_SMTP__MAX_CONNECTIONS_PER_NETWORK", "400")
    smtp = load_settings(SHIPPED_CONFIG).smtp
    assert (smtp.max_connections_per_network, smtp.network_prefix_ipv4, smtp.network_prefix_ipv6) == (400, 24, 64)


def test_misspelled_environment_setting_is_an_error():
    result = _check_config(SHIPPED_CONFIG, INTAKE_SMTP__LISTN="127.0.0.1:25")
    assert result.returncode == EXIT_CONFIG
    assert "INTAKE_SMTP__LISTN" in result.stderr


def test_bad_environment_value_names_the_key():
    result = _check_config(SHIPPED_CONFIG, INTAKE_SMTP__ADDRESSES="security@example.com")  # not JSON
    assert result.returncode == EXIT_CONFIG
    assert "smtp" in result.stderr and "addresses" in result.stderr.lower()


def test_missing_config_file_is_a_config_error(tmp_path: Path):
    result = _check_config(tmp_path / "absent.toml")
    assert result.returncode == EXIT_CONFIG
    assert "no such config file" in result.stderr


@pytest.mark.skipif(SYSTEM_CONFIG.is_file(), reason=f"{SYSTEM_CONFIG} exists: it comes before ./config.toml")
def test_config_location_defaults_to_cwd_then_environment(tmp_path: Path):
    (tmp_path / "config.toml").write_text(SHIPPED_CONFIG.read_text())
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INTAKE_")}
    in_cwd = subprocess.run([str(INTAKE), "check-config"], cwd=tmp_path, capture_output=True, text=True,
                            env=environment)
    assert in_cwd.returncode == 0 and str(tmp_path / "config.toml") in in_cwd.stdout
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "intake.toml").write_text(SHIPPED_CONFIG.read_text())
    by_env = subprocess.run([str(INTAKE), "check-config"], cwd=tmp_path, capture_output=True, text=True,
                            env=environment | {"INTAKE_CONFIG": str(other / "intake.toml")})
    assert by_env.returncode == 0 and str(other / "intake.toml") in by_env.stdout


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path):
    config = _write(tmp_path, SHIPPED_CONFIG.read_text())
    settings = load_settings(config)
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'intake.db'}"
    assert settings.maildir_path == tmp_path / "var" / "outbox"


def test_secrets_come_from_credentials_directory_or_environment(tmp_path: Path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "relay-password").write_text("s3cret\n")
    assert read_secret("relay-password", {"CREDENTIALS_DIRECTORY": str(credentials)}) == "s3cret"
    assert read_secret("relay-password", {"INTAKE_RELAY_PASSWORD": "from-env"}) == "from-env"
    # The credentials directory (systemd LoadCredential=) wins over the environment.
    assert read_secret("relay-password", {"CREDENTIALS_DIRECTORY": str(credentials),
                                          "INTAKE_RELAY_PASSWORD": "from-env"}) == "s3cret"
    assert read_secret("relay-password", {}) is None
    # The secret's environment variable is not mistaken for a misspelled setting.
    assert _check_config(SHIPPED_CONFIG, INTAKE_RELAY_PASSWORD="x").returncode == 0


def test_policy_by_address_maps_plain_and_tagged_addresses(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INTAKE_INTAKE__POLICY_BY_ADDRESS",
                       '{"security+vectis@example.com": "vectis-mail", "psirt@example.com": "emailconnect"}')
    monkeypatch.setenv("INTAKE_SMTP__ADDRESSES", '["security@example.com", "psirt@example.com"]')
    settings = load_settings(SHIPPED_CONFIG)
    assert settings.policy_for("security+vectis@example.com") == "vectis-mail"
    assert settings.policy_for("Security+Vectis@Example.com") == "vectis-mail"
    assert settings.policy_for("security@example.com") == "vaixus"
    assert settings.policy_for("psirt+anything@example.com") == "emailconnect"


def test_unknown_policy_in_mapping_is_rejected(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INTAKE_INTAKE__POLICY_BY_ADDRESS", '{"security+x@example.com": "missing"}')
    with pytest.raises(ConfigError, match="missing"):
        load_settings(SHIPPED_CONFIG)


def test_the_old_name_of_quality_rules_is_read_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rules = tmp_path / "mine.toml"
    rules.write_text('threshold = 1.0\n[[rule]]\nname = "begging"\ndescription = "asks for money"\nscore = 1.0\n'
                     'body = ["bounty"]\n')
    shipped = SHIPPED_CONFIG.read_text()
    old = _write(tmp_path, shipped.replace('# quality_rules = "low-quality.toml"', 'spam_rules = "mine.toml"'))
    settings = load_settings(old)
    assert [rule.name for rule in settings.quality_rules.rules] == ["begging"]
    assert settings.warnings == ["intake.spam_rules is now called intake.quality_rules: rename it in the config file"]
    checked = _check_config(old)  # what the operator sees
    assert checked.returncode == 0 and "intake.spam_rules is now called intake.quality_rules" in checked.stderr

    new = _write(tmp_path, shipped.replace('# quality_rules = "low-quality.toml"', 'quality_rules = "mine.toml"'))
    assert load_settings(new).warnings == []

    monkeypatch.setenv("INTAKE_INTAKE__SPAM_RULES", str(rules))
    by_env = load_settings(_write(tmp_path, shipped))
    assert [rule.name for rule in by_env.quality_rules.rules] == ["begging"]
    assert by_env.warnings == ["INTAKE_INTAKE__SPAM_RULES is now called INTAKE_INTAKE__QUALITY_RULES: rename it in "
                               "the environment"]
    monkeypatch.setenv("INTAKE_INTAKE__QUALITY_RULES", str(rules))
    with pytest.raises(ConfigError, match="INTAKE_INTAKE__SPAM_RULES: renamed INTAKE_INTAKE__QUALITY_RULES"):
        load_settings(_write(tmp_path, shipped))
    monkeypatch.delenv("INTAKE_INTAKE__SPAM_RULES")
    monkeypatch.delenv("INTAKE_INTAKE__QUALITY_RULES")

    both = _write(tmp_path, shipped.replace('# quality_rules = "low-quality.toml"',
                                            'quality_rules = "mine.toml"\nspam_rules = "mine.toml"'))
    refused = _check_config(both)
    assert refused.returncode == 78 and "intake.spam_rules: renamed intake.quality_rules" in refused.stderr
