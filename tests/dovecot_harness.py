"""A private, real Dovecot (Debian's dovecot-imapd 2.3) for the fetch tests: the hosted mailbox.

One instance has its own config, runtime and mail folders, listens only on 127.0.0.1 for IMAPS
(a throwaway trustme certificate) and knows one user with a known password (passwd-file), whose
Maildir the tests fill by IMAP APPEND. Dovecot's master wants root; mail is accessed as the
`mail` user (Dovecot never accesses mail as root), so the instance's folder is a private
temporary folder owned by it, not pytest's root-only tmp_path. Where the binary or root is
missing, or the instance does not start, `start_dovecot` raises `DovecotUnavailable` with the
reason, for the tests to skip with.

An instance started with a :class:`TokenInfo` also takes OAuth2 bearer tokens (SASL XOAUTH2 and
OAUTHBEARER, Dovecot's oauth2 passdb), which it checks by asking that tiny HTTP endpoint on
127.0.0.1, as a hosted provider's IMAP server asks its identity service.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import trustme
from imapclient import IMAPClient

DOVECOT = "/usr/sbin/dovecot"
MAIL_USER = "mail"
USER, PASSWORD = "security@example.com", "correct horse battery staple"
COMMAND_TIMEOUT = 20

CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
auth_mechanisms = plain{oauth2_mechanisms}
# A wrong password is refused at once, not after Dovecot's 2 s (the tests try one).
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
mail_location = maildir:{root}/home/%u/Maildir
passdb {{
  driver = passwd-file
  mechanisms = plain
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
{oauth2_passdb}userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    port = {starttls_port}
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service imap-login {{
  chroot =
}}
"""


# With a TokenInfo: tokens are checked by its endpoint, whose answer names the user (email) and
# says whether the token is active; nothing is cached (auth_cache_size is 0 by default), so a
# token the endpoint stops accepting is refused at the next login.
OAUTH2_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf.ext
}}
"""
OAUTH2_CONF = """\
tokeninfo_url = http://127.0.0.1:{port}/tokeninfo?access_token=
username_attribute = email
active_attribute = active
active_value = true
"""


class TokenInfo:
    """An OAuth2 token-info endpoint on 127.0.0.1 (http.server in a thread): a token in `valid`
    gets 200 and the user it belongs to, any other 401. `asked` lists the tokens it was asked
    about, in order."""

    def __init__(self, user: str = USER):
        self.valid: set[str] = set()
        self.asked: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                token = parse_qs(urlparse(self.path).query).get("access_token", [""])[0]
                endpoint.asked.append(token)
                accepted = token in endpoint.valid
                body = (b'{"email": "%s", "active": "true"}' % user.encode() if accepted
                        else b'{"error": "invalid_token"}')
                self.send_response(200 if accepted else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # quiet: pytest shows what matters
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="tokeninfo", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class DovecotUnavailable(Exception):
    """Why no private Dovecot can run here (the tests skip with this reason)."""


@dataclass
class Dovecot:
    """A running private instance: IMAPS on 127.0.0.1:`port`, trusting `ca_file`."""

    root: Path
    port: int
    ca_file: Path
    starttls_port: int = 0  # plain IMAP that must switch to TLS (STARTTLS) before logging in
    user: str = USER
    password: str = PASSWORD

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    def start(self) -> None:
        # Its output to a file, not a pipe: the daemon keeps the descriptors it was started with.
        with open(self.root / "start.log", "w+") as output:
            done = subprocess.run([DOVECOT, "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=output,
                                  stderr=output, timeout=COMMAND_TIMEOUT)
            output.seek(0)
            said = output.read().strip()
        if done.returncode != 0:
            raise DovecotUnavailable(f"dovecot did not start: {said}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise DovecotUnavailable(f"dovecot started but does not listen on port {self.port}: {self.log()}")

    def stop(self) -> None:
        """Stop the instance at once: SIGKILL to its master's children, then to the master. (A
        throwaway with nothing to save: `dovecot stop` takes 2-3 s waiting on its login process,
        a tenth of the fetch tests' time budget per test.)"""
        try:
            master = self._master()
        except (OSError, ValueError):
            return
        for pid in self._children(master):
            _kill(pid)
        _kill(master)
        (self.root / "run" / "master.pid").unlink(missing_ok=True)

    def _master(self) -> int:
        return int((self.root / "run" / "master.pid").read_text())

    @staticmethod
    def _children(master: int, name: str | None = None) -> list[int]:
        """The processes *master* started (named *name*, if given)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == master and name in (None, comm):
                found.append(int(entry.name))
        return found

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def kill_imap_sessions(self) -> int:
        """SIGKILL this instance's imap processes (the master's children named imap): every client's
        connection drops at once, as when the server crashes. Returns how many were killed."""
        sessions = self._children(self._master(), "imap")
        for pid in sessions:
            _kill(pid)
        return len(sessions)

    def client(self) -> IMAPClient:
        """A logged-in IMAPS client, as another mail program of the mailbox's owner."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        client = IMAPClient("127.0.0.1", port=self.port, ssl=True, ssl_context=context, timeout=10)
        client.login(self.user, self.password)
        return client

    def append(self, messages: list[bytes], folder: str = "INBOX") -> None:
        with self.client() as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)
            client.multiappend(folder, messages)  # one command (RFC 3502): 200 APPENDs took a second

    def folder_state(self, folder: str = "INBOX") -> tuple[int, int]:
        """(messages, seen ones) in *folder*, expunged ones not counted."""
        with self.client() as client:
            if not client.folder_exists(folder):
                return 0, 0
            client.select_folder(folder, readonly=True)
            return len(client.search("ALL")), len(client.search("SEEN"))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_dovecot(port: int, starttls_port: int = 0, tokeninfo: TokenInfo | None = None) -> Dovecot:
    """Start a private instance on 127.0.0.1:*port* (IMAPS; STARTTLS on *starttls_port* if given;
    OAuth2 bearer tokens checked by *tokeninfo* if given, passwords either way), in a new temporary
    folder (under /tmp, which the mail user can reach: pytest's folders are root's alone); `remove`
    it once stopped."""
    if not os.path.exists(DOVECOT):
        raise DovecotUnavailable(f"{DOVECOT} is missing (Debian: apt-get install dovecot-imapd)")
    if os.geteuid() != 0:
        raise DovecotUnavailable("a private Dovecot needs root (its master process and mail user)")
    try:
        mail = pwd.getpwnam(MAIL_USER)
        pwd.getpwnam("dovecot"), pwd.getpwnam("dovenull")
    except KeyError as exc:
        raise DovecotUnavailable(f"a user Dovecot needs is missing: {exc}") from None
    root = Path(tempfile.mkdtemp(prefix="intake-test-dovecot-"))
    os.chmod(root, 0o755)
    for folder in ("run", "state", "home"):
        (root / folder).mkdir()
    shutil.chown(root / "home", mail.pw_uid, mail.pw_gid)
    os.chmod(root / "home", 0o700)
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    certificate.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    certificate.private_key_pem.write_to_path(str(root / "key.pem"))
    os.chmod(root / "key.pem", 0o600)
    authority.cert_pem.write_to_path(str(root / "ca.pem"))
    (root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
    if tokeninfo is not None:
        (root / "oauth2.conf.ext").write_text(OAUTH2_CONF.format(port=tokeninfo.port))
    (root / "dovecot.conf").write_text(CONF.format(
        root=root, port=port, starttls_port=starttls_port, uid=mail.pw_uid, gid=mail.pw_gid,
        oauth2_mechanisms=" xoauth2 oauthbearer" if tokeninfo else "",
        oauth2_passdb=OAUTH2_PASSDB.format(root=root) if tokeninfo else ""))
    dovecot = Dovecot(root, port, root / "ca.pem", starttls_port)
    try:
        dovecot.start()
    except (DovecotUnavailable, subprocess.TimeoutExpired) as exc:
        dovecot.stop()
        dovecot.remove()
        raise DovecotUnavailable(f"{exc}; log: {dovecot.log()}") from None
    return dovecot
