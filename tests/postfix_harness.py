"""A private, real Postfix (Debian's postfix 3.7) for tests: the MX in front of intake.

One instance has its own config, queue and data folders and listens only on 127.0.0.1: its
smtpd is the MX (mail for the security addresses goes to intake's listener by a transport map,
with XFORWARD, over STARTTLS or not at all) and the relay intake sends through (mail for the researchers' domain goes to a
test sink). Every nexthop is a literal loopback address and DNS is off, so nothing leaves the
machine. The settings README's "Behind Postfix" gives are the ones written here.

Postfix wants root: its queue belongs to root and its daemons run as `postfix`/`postdrop`. Where
the binaries, the users or root are missing, or the instance does not start, `start_postfix`
raises `PostfixUnavailable` with the reason, for the tests to skip with.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
DAEMONS = Path("/usr/lib/postfix/sbin")
COMMAND_TIMEOUT = 20  # seconds for any one postfix command: none should take more than one

# Services of the private instance: the stock Debian master.cf's, none chrooted (the queue is a
# temporary folder), plus the MX listener and the transport to intake (filled in at start).
MASTER_CF = """\
127.0.0.1:{mx_port} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
smtp      unix  - - n -     - smtp
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
intake    unix  - - n -     - smtp
  -o syslog_name=postfix/intake
  -o smtp_send_xforward_command=yes
  -o smtp_tls_security_level=encrypt
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = {myhostname}
mydestination =
alias_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# Only loopback: the test client's addresses are never resolved, no nexthop is looked up.
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
# What README "Behind Postfix" says: intake's domain relayed to it, only its addresses accepted,
# intake (on loopback) may relay out through this Postfix, one size limit for both.
relay_domains = {domain}
relay_recipient_maps = hash:{config}/intake_recipients
transport_maps = hash:{config}/transport
recipient_delimiter = +
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
message_size_limit = {message_size_limit}
smtp_tls_security_level = may
smtp_tls_loglevel = 1
"""


class PostfixUnavailable(Exception):
    """Why no private Postfix can run here (the tests skip with this reason)."""


@dataclass
class Postfix:
    """A running private instance. `port` is its MX smtpd on 127.0.0.1."""

    root: Path
    port: int
    myhostname: str

    @property
    def config(self) -> Path:
        return self.root / "config"

    def command(self, *args: str, check: bool = True) -> str:
        """Run a Postfix command (postqueue, postsuper, postconf …) on this instance."""
        done = subprocess.run([*args[:1], "-c", str(self.config), *args[1:]], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr}{self.log()}")
        return done.stdout

    def flush(self) -> None:
        """Deliver deferred mail now, dead destinations forgotten: no test waits for a retry."""
        self.command("postqueue", "-f")

    def queue(self) -> list[str]:
        """Queue ids of the mail Postfix holds (`postqueue -j`: one JSON object per message)."""
        return [json.loads(line)["queue_id"] for line in self.command("postqueue", "-j").splitlines() if line]

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        """Poll *condition*, flushing the queue every second, until it holds or *timeout*."""
        deadline = time.monotonic() + timeout
        next_flush = time.monotonic() + 1.0
        while not condition():
            now = time.monotonic()
            if now > deadline:
                raise AssertionError(f"timed out waiting for {what}; Postfix's log:\n{self.log()[-4000:]}")
            if now > next_flush:
                self.flush()
                next_flush = now + 1.0
            time.sleep(0.05)

    def stop(self) -> None:
        """`postfix stop`, then make sure the master and its children are gone, and remove the folder."""
        master = _master_pid(self.root)
        children = _children(master) if master else []
        subprocess.run([POSTFIX, "-c", str(self.config), "stop"], capture_output=True, timeout=COMMAND_TIMEOUT)
        deadline = time.monotonic() + 5
        while master and _alive(master) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in ([master] if master else []) + children:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it exited in between
        shutil.rmtree(self.root, ignore_errors=True)


def _master_pid(root: Path) -> int | None:
    try:
        return int((root / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _children(parent: int) -> list[int]:
    """Processes whose parent is *parent* (the master's daemons), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The field after the command (which is in parentheses and may hold spaces) is the state, then the ppid.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent can reap it


def unavailable_reason() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    if not (Path(POSTFIX).exists() and (DAEMONS / "master").exists() and shutil.which("postmap")):
        return "Postfix tests skipped: postfix is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "Postfix tests skipped: a private Postfix instance needs root"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "Postfix tests skipped: no postfix user or postdrop group"
    return None


def start_postfix(*, mx_port: int, intake_port: int, sink_port: int, message_size_limit: int,
                  addresses: list[str], researcher_domain: str, myhostname: str = "mx.example.com") -> Postfix:
    """Start a private Postfix: MX on 127.0.0.1:*mx_port*; mail for *addresses* (and their +tag
    forms) to intake at 127.0.0.1:*intake_port*; mail for *researcher_domain* to the sink at
    127.0.0.1:*sink_port*; everything else refused."""
    reason = unavailable_reason()
    if reason:
        raise PostfixUnavailable(reason)
    domain = addresses[0].rsplit("@", 1)[1]
    # Not under pytest's folder: that is private to root, and Postfix's daemons run as postfix.
    root = Path(tempfile.mkdtemp(prefix="intake-test-postfix-"))
    root.chmod(0o755)
    config = root / "config"
    for folder in (config, root / "queue", root / "data"):
        folder.mkdir()
    shutil.chown(root / "data", "postfix")
    (config / "main.cf").write_text(MAIN_CF.format(root=root, config=config, myhostname=myhostname, domain=domain,
                                                   message_size_limit=message_size_limit))
    (config / "master.cf").write_text(MASTER_CF.format(mx_port=mx_port))
    # Postfix waits (up to two seconds) for a main.cf modified this instant to settle: date it back.
    settled = time.time() - 60
    os.utime(config / "main.cf", (settled, settled))
    (config / "intake_recipients").write_text("".join(f"{address} OK\n" for address in addresses))
    (config / "transport").write_text(
        "".join(f"{address} intake:[127.0.0.1]:{intake_port}\n" for address in addresses)
        + f"{researcher_domain} smtp:[127.0.0.1]:{sink_port}\n")
    postfix = Postfix(root, mx_port, myhostname)
    try:
        for table in ("intake_recipients", "transport"):
            postfix.command("postmap", f"hash:{config / table}")
        started = subprocess.run([POSTFIX, "-c", str(config), "start"], capture_output=True, text=True,
                                 timeout=COMMAND_TIMEOUT)
        if started.returncode != 0:
            raise PostfixUnavailable(f"Postfix tests skipped: the private instance did not start: "
                                     f"{(started.stderr + postfix.log()).strip()[-500:]}")
        _wait_listening(postfix)
    except BaseException:
        postfix.stop()
        raise
    return postfix


def _wait_listening(postfix: Postfix, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", postfix.port), timeout=2) as probe:
                if probe.recv(100).startswith(b"220"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PostfixUnavailable("Postfix tests skipped: the private instance never answered on "
                                     f"127.0.0.1:{postfix.port}: {postfix.log()[-500:]}")
        time.sleep(0.05)
