"""A private, real Dovecot (Debian's dovecot-imapd 2.3) for the fetch tests: the hosted mailbox.

One instance has its own config, runtime and mail folders, listens only on 127.0.0.1 for IMAPS
(a throwaway trustme certificate) and knows one user with a known password (passwd-file), whose
Maildir the tests fill by IMAP APPEND. Dovecot's master wants root; mail is accessed as the
`mail` user (Dovecot never accesses mail as root), so the instance's folder is a private
temporary folder owned by it, not pytest's root-only tmp_path. Where the binary or root is
missing, or the instance does not start, `start_dovecot` raises `DovecotUnavailable` with the
reason, for the tests to skip with.
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
import time
from dataclasses import dataclass
from pathlib import Path

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
auth_mechanisms = plain
# A wrong password is refused at once, not after Dovecot's 2 s (the tests try one).
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
mail_location = maildir:{root}/home/%u/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
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


def start_dovecot(port: int, starttls_port: int = 0) -> Dovecot:
    """Start a private instance on 127.0.0.1:*port* (IMAPS; STARTTLS on *starttls_port* if given), in a new temporary folder (under /tmp, which
    the mail user can reach: pytest's folders are root's alone); `remove` it once stopped."""
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
    (root / "dovecot.conf").write_text(CONF.format(root=root, port=port, starttls_port=starttls_port,
                                                     uid=mail.pw_uid, gid=mail.pw_gid))
    dovecot = Dovecot(root, port, root / "ca.pem", starttls_port)
    try:
        dovecot.start()
    except (DovecotUnavailable, subprocess.TimeoutExpired) as exc:
        dovecot.stop()
        dovecot.remove()
        raise DovecotUnavailable(f"{exc}; log: {dovecot.log()}") from None
    return dovecot
