"""What large messages cost intake in memory: peak RSS per process for 25 MB mail (issue 18).

Starts ``intake serve`` (the shipped config.toml, a fresh SQLite database, acknowledgements to a
Maildir), sends one small warm-up message (so the worker and its parse helper are up), then:

1. **one** message of about 25 MB: a short text part and an 18 MiB attachment (random bytes,
   base64: 25.8 MB on the wire), over one SMTP session;
2. **ten** such messages (``--messages``) over **4** concurrent SMTP sessions (``--concurrency``),
   each session one connection sending its share one after the other.

For each phase it reports, per process of intake's process group (the listener, i.e. the
``intake serve`` process; the ``intake-worker`` child; the worker's parse helper), the peak RSS
above that process's idle RSS (measured after the warm-up, when everything is quiet) and that peak
as a multiple of one message's size; and the whole group's peak RSS (the sum of every process's
RSS, sampled every ``SAMPLE_INTERVAL`` s; its PSS at the same samples is reported beside it, for
information: RSS counts the pages the processes share, the interpreter's and the libraries', once
per process, as the goal does). Per-process peaks are the kernel's own high-water mark
(``VmHWM`` of /proc/PID/status, reset through /proc/PID/clear_refs before each phase), so no
short peak between two samples is missed; a process that appears during a phase (a replaced
helper) is counted by its sampled RSS and its own VmHWM.

Also: the time from the first byte sent to each ``250``, and to every message having a ticket
(read from the database read-only); and every measured message's
attachment is read back with ``intake attachment`` and its sha256 compared with what was sent.

Goals (issue 18): in phase 1, each process's peak above idle <= 3x the message's size; in phase
2, the whole group's peak RSS <= 400 MB; every attachment intact.

    .venv/bin/python benchmarks/large_message.py                 # ~1-3 min on 2 CPUs
    .venv/bin/python benchmarks/large_message.py --encryption    # with a storage key
    .venv/bin/python benchmarks/large_message.py --json

Only 127.0.0.1 is contacted. Everything is bounded by ``--timeout``; the server is stopped (its
process group: SIGTERM, then SIGKILL) at the end, on error and on Ctrl-C.
Exit status: 0 goals met, 1 a goal missed or the run incomplete, 2 the server failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import closing
from dataclasses import asdict, dataclass, field
from email.utils import formatdate
from pathlib import Path

from throughput import (HOST, INTAKE, RECIPIENT, ServerFailed, ServerProcess, describe_machine, free_port,
                        intake_server, parse_intake_env, parse_size)

SAMPLE_INTERVAL = 0.02  # seconds between RSS samples of the process group
IDLE_SETTLE = 1.0  # seconds of quiet after the warm-up before idle RSS is read
COMMAND_TIMEOUT = 300.0  # seconds for one SMTP command (DATA of 25 MB on a loaded machine included)
RETRY_PAUSE = 1.0  # seconds before a deferred (4xx) message is sent again
MAX_ATTEMPTS = 60  # transactions per message before the benchmark gives up on it
POLL_INTERVAL = 0.2  # seconds between database checks while waiting for tickets
PER_PROCESS_GOAL = 3.0  # peak above idle, as a multiple of one message's size
TREE_GOAL_BYTES = 400 * 1000 * 1000  # whole service's peak RSS while it takes the ten messages
MB = 1000 * 1000
REPORTER = "researcher@reporter.test"  # the envelope sender; each message has its own From (no acknowledgement limit)
# Memory is measured, not CPU: parsing an 18 MiB attachment takes 0.7-1 s of CPU on a quiet
# machine, more on a busy one; these keep the shipped budget from cutting it (attachment lost).
# claim_lease must be at least twice parse_timeout (the config refuses less).
DEFAULT_OVERRIDES = {"INTAKE_PROCESSING__MESSAGE_BUDGET": "60", "INTAKE_PROCESSING__PARSE_TIMEOUT": "120",
                     "INTAKE_PROCESSING__CLAIM_LEASE": "240",
                     "INTAKE_SMTP__IDLE_TIMEOUT": "300"}


# -- the messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LargeMessage:
    data: bytes  # the message as sent (CRLF line ends)
    attachment_sha256: str


def build_message(run_tag: str, index: int, attachment_size: int) -> LargeMessage:
    """A multipart/mixed report: a short text part and *attachment_size* random bytes, base64."""
    attachment = os.urandom(attachment_size)
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")  # 76-character lines
    boundary = f"=={run_tag}{index}=="
    head = (f"From: Researcher {index} <researcher-{run_tag}-{index}@reporter.test>\r\nTo: {RECIPIENT}\r\n"
            f"Subject: Large report {run_tag} #{index}: crash dump attached\r\n"
            f"Date: {formatdate(localtime=False)}\r\nMessage-ID: <large-{run_tag}-{index}@reporter.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "A heap overflow in the parser; the core dump is attached.\r\n\r\n"
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Disposition: attachment; filename=\"core-{index}.bin\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode()
    data = head + encoded + f"--{boundary}--\r\n".encode()
    return LargeMessage(data, hashlib.sha256(attachment).hexdigest())


def warm_up_message(run_tag: str) -> bytes:
    return (f"From: <{REPORTER}>\r\nTo: {RECIPIENT}\r\nSubject: warm-up {run_tag}\r\n"
            f"Date: {formatdate(localtime=False)}\r\nMessage-ID: <warm-{run_tag}@reporter.test>\r\n\r\n"
            "Warming up.\r\n").encode()


# -- sending ---------------------------------------------------------------------------------


@dataclass
class Sent:
    accepted: int = 0
    deferred: int = 0  # transactions answered 4xx (e.g. 452: the listener's memory budget is full), sent again
    refused: list[str] = field(default_factory=list)  # reply or error of each message given up on
    seconds_to_250: list[float] = field(default_factory=list)  # from the phase's start, per accepted message
    attachment_sha256: list[str] = field(default_factory=list)  # of the accepted messages


def send_sessions(port: int, messages: list[LargeMessage], sessions: int, started: float) -> Sent:
    """Send *messages* over *sessions* concurrent connections (message i on session i mod sessions).
    A 4xx answer is retried on the same connection after RETRY_PAUSE, as an MTA retries (at most
    MAX_ATTEMPTS times)."""
    sent, lock = Sent(), threading.Lock()

    def send_one(client: smtplib.SMTP, message: LargeMessage) -> None:
        for _ in range(MAX_ATTEMPTS):
            try:
                client.sendmail(REPORTER, [RECIPIENT], message.data)
            except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused, smtplib.SMTPRecipientsRefused) as exc:
                code = getattr(exc, "smtp_code", 0) or min((c for c, _ in getattr(exc, "recipients", {}).values()),
                                                           default=0)
                if 400 <= code < 500:
                    with lock:
                        sent.deferred += 1
                    client.rset()
                    time.sleep(RETRY_PAUSE)
                    continue
                with lock:
                    sent.refused.append(repr(exc)[:200])
                return
            with lock:
                sent.accepted += 1
                sent.seconds_to_250.append(time.monotonic() - started)
                sent.attachment_sha256.append(message.attachment_sha256)
            return
        with lock:
            sent.refused.append(f"deferred {MAX_ATTEMPTS} times")

    def session(share: list[LargeMessage]) -> None:
        try:
            with smtplib.SMTP(HOST, port, local_hostname="bench.test", timeout=COMMAND_TIMEOUT) as client:
                for message in share:
                    send_one(client, message)
        except (OSError, smtplib.SMTPException) as exc:  # the session is lost: its other messages too
            with lock:
                sent.refused.append(f"session: {exc!r}"[:200])

    threads = [threading.Thread(target=session, args=(messages[n::sessions],)) for n in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(COMMAND_TIMEOUT * MAX_ATTEMPTS * (len(messages) + 1))
    return sent


# -- memory of intake's processes ------------------------------------------------------------


def group_processes(group: int) -> dict[int, str]:
    """pid -> role of every process in process group *group*: ``listener`` (the group leader,
    ``intake serve``), ``worker`` (its child), ``parse-helper`` (the worker's child), or
    ``other`` (multiprocessing's resource tracker)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[2]) == group:  # pgrp
            parents[int(entry)] = int(fields[1])  # ppid
    roles = {}
    for pid, parent in parents.items():
        try:
            tracker = b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if pid == group:
            roles[pid] = "listener"
        elif tracker:
            roles[pid] = "other"
        elif parent == group:
            roles[pid] = "worker"
        else:
            roles[pid] = "parse-helper"
    return roles


def memory_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of *pid* in bytes, and its Threads (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) * 1024
        elif name == "Threads":
            values[name] = int(rest)
    return values


def proportional_set_size(pid: int) -> int:
    """PSS of *pid* in bytes: its RSS with each page shared with other processes (the interpreter,
    shared libraries) counted as its share; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak(pid: int) -> None:
    """Set the kernel's peak RSS of *pid* (VmHWM) to its RSS now (clear_refs 5, Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


class MemorySampler:
    """Samples the RSS of every process in a process group in a thread: the group's peak (sum of
    its processes at one sample) and each process's own peak (max of samples and VmHWM). Also the
    group's peak PSS (shared pages counted once), for information: the goal is on RSS."""

    def __init__(self, group: int):
        self._group = group
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.tree_peak = 0
        self.tree_pss_peak = 0
        self.most_tasks = 0  # threads of all the group's processes together (what systemd's TasksMax counts)
        self.peaks: dict[int, int] = {}
        self.roles: dict[int, str] = {}

    def __enter__(self) -> MemorySampler:
        for pid in group_processes(self._group):
            reset_peak(pid)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self._sample()

    def _sample(self) -> None:
        total = tasks = pss = 0
        for pid, role in group_processes(self._group).items():
            status = memory_status(pid)
            if not status:
                continue
            self.roles[pid] = role
            total += status["VmRSS"]
            pss += proportional_set_size(pid)
            tasks += status["Threads"]
            self.peaks[pid] = max(self.peaks.get(pid, 0), status["VmRSS"], status["VmHWM"])
        self.tree_peak = max(self.tree_peak, total)
        self.tree_pss_peak = max(self.tree_pss_peak, pss)
        self.most_tasks = max(self.most_tasks, tasks)

    def peak_by_role(self) -> dict[str, int]:
        peaks: dict[str, int] = {}
        for pid, peak in self.peaks.items():
            role = self.roles[pid]
            peaks[role] = max(peaks.get(role, 0), peak)
        return peaks


def idle_rss(group: int) -> tuple[dict[str, int], int, int]:
    """RSS per role (the largest process of each) and of the whole group, and the group's PSS, now."""
    by_role: dict[str, int] = {}
    total = pss = 0
    for pid, role in group_processes(group).items():
        rss = memory_status(pid).get("VmRSS", 0)
        total += rss
        pss += proportional_set_size(pid)
        by_role[role] = max(by_role.get(role, 0), rss)
    return by_role, total, pss


# -- the database, read-only -----------------------------------------------------------------


def count_done(database: Path) -> tuple[int, int]:
    """(tickets, messages still pending)."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
        return db.execute("SELECT (SELECT count(*) FROM ticket),"
                          " (SELECT count(*) FROM inbound_message WHERE status = 'pending')").fetchone()


def wait_until_done(database: Path, count: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        done, pending = count_done(database)
        if done >= count:
            return True
        if not pending:  # nothing left to process, yet fewer done: some failed or were not taken as reports
            return False
        time.sleep(POLL_INTERVAL)
    return False


def ticket_references(database: Path, after: int) -> list[str]:
    """References of every ticket but the first *after* (in the order they were opened)."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as db:
        return [row[0] for row in db.execute("SELECT reference FROM ticket ORDER BY id LIMIT -1 OFFSET ?", (after,))]


def attachment_digests(server: ServerProcess, config: Path, references: list[str], workdir: Path) -> list[str]:
    """sha256 of attachment 1 of each ticket, as ``intake attachment`` writes it ("" when it fails)."""
    digests = []
    for reference in references:
        out = workdir / f"attachment-{reference}"
        done = subprocess.run([str(INTAKE), "--config", str(config), "attachment", reference, "1", "-o", str(out),
                               "--force"], env=server._env,  # the server's own settings (database, storage key)
                               capture_output=True, timeout=COMMAND_TIMEOUT)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest() if done.returncode == 0 and out.exists() else "")
        out.unlink(missing_ok=True)
    return digests


# -- one run ---------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    messages: int
    sessions: int
    message_bytes: int
    accepted: int = 0
    deferred: int = 0  # 4xx answers (sent again)
    refused: list[str] = field(default_factory=list)
    seconds_to_last_250: float | None = None
    seconds_to_tickets: float | None = None  # every accepted message has a ticket
    peak_above_idle: dict[str, int] = field(default_factory=dict)  # role -> bytes
    tree_peak: int = 0  # bytes: the whole group's RSS at its highest sample
    tree_pss_peak: int = 0  # bytes: the whole group's PSS at its highest sample (shared pages counted once)
    most_tasks: int = 0  # the group's threads at most, at one sample
    attachments_intact: int = 0  # of the accepted messages

    def multiple(self, role: str) -> float:
        return self.peak_above_idle.get(role, 0) / self.message_bytes


def run_phase(server: ServerProcess, database: Path, config: Path, workdir: Path, idle: dict[str, int],
              phase: Phase, attachment_size: int, tickets_before: int, deadline: float) -> Phase:
    run_tag = uuid.uuid4().hex[:10]
    messages = [build_message(run_tag, index, attachment_size) for index in range(phase.messages)]
    phase.message_bytes = max(len(message.data) for message in messages)
    progress(f"{phase.name}: {phase.messages} x {phase.message_bytes / MB:.1f} MB over {phase.sessions} session(s)")
    with MemorySampler(server.group) as sampler:
        started = time.monotonic()
        sent = send_sessions(server.port, messages, phase.sessions, started)
        if sent.seconds_to_250:
            phase.seconds_to_last_250 = max(sent.seconds_to_250)
        if wait_until_done(database, tickets_before + sent.accepted, deadline):
            phase.seconds_to_tickets = time.monotonic() - started
    phase.accepted, phase.deferred, phase.refused = sent.accepted, sent.deferred, sent.refused
    phase.tree_peak, phase.tree_pss_peak, phase.most_tasks = sampler.tree_peak, sampler.tree_pss_peak, sampler.most_tasks
    phase.peak_above_idle = {role: max(peak - idle.get(role, 0), 0) for role, peak in sampler.peak_by_role().items()}
    digests = attachment_digests(server, config, ticket_references(database, tickets_before), workdir)
    phase.attachments_intact = len(set(digests) & set(sent.attachment_sha256))
    return phase


def run(args: argparse.Namespace) -> dict[str, object]:
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="intake-bench-large-") as tmp:
        workdir, port = Path(tmp), free_port()
        database = workdir / "intake.db"
        overrides = {**DEFAULT_OVERRIDES, **dict(args.intake_env)}
        if args.encryption:
            key = workdir / "storage.key"
            subprocess.run([str(INTAKE), "storage", "keygen", str(key)], check=True, capture_output=True)
            overrides["INTAKE_STORAGE__KEY_FILE"] = str(key)
        server = intake_server(workdir / "node", port, f"sqlite:///{database}", overrides)
        config = workdir / "node" / "config.toml"
        with server:
            server.wait_until_ready(deadline)
            with smtplib.SMTP(HOST, port, timeout=COMMAND_TIMEOUT) as client:
                client.sendmail(REPORTER, [RECIPIENT], warm_up_message(uuid.uuid4().hex[:10]))
            if not wait_until_done(database, 1, deadline):
                raise ServerFailed(f"intake did not process the warm-up message\n{server.log_tail()}")
            time.sleep(IDLE_SETTLE)
            idle, idle_total, idle_pss = idle_rss(server.group)
            progress("idle RSS: " + ", ".join(f"{role} {rss / MB:.1f} MB" for role, rss in sorted(idle.items()))
                     + f"; in all {idle_total / MB:.1f} MB (PSS {idle_pss / MB:.1f} MB)")
            phases = [Phase("one", 1, 1, 0), Phase("ten", args.messages, args.concurrency, 0)]
            done = 1
            for phase in phases:
                run_phase(server, database, config, workdir, idle, phase, args.attachment_size, done, deadline)
                done += phase.accepted
                progress(format_phase(phase))
    return {"machine": describe_machine(), "encryption": args.encryption,
            "idle_rss": idle, "idle_rss_total": idle_total, "idle_pss_total": idle_pss,
            "phases": [asdict(phase) for phase in phases],
            "goals": evaluate(phases)}


def evaluate(phases: list[Phase]) -> list[dict[str, object]]:
    one, ten = phases
    goals = [{"goal": f"{role} peak above idle <= {PER_PROCESS_GOAL:g}x message (one message)",
              "value": round(one.multiple(role), 2), "passed": one.multiple(role) <= PER_PROCESS_GOAL}
             for role in ("listener", "worker", "parse-helper")]
    goals.append({"goal": f"whole service peak RSS <= {TREE_GOAL_BYTES // MB} MB ({ten.messages} messages, "
                          f"{ten.sessions} sessions)", "value": round(ten.tree_peak / MB, 1),
                  "passed": ten.tree_peak <= TREE_GOAL_BYTES})
    for phase in phases:
        complete = (phase.accepted == phase.messages and phase.seconds_to_tickets is not None
                    and phase.attachments_intact == phase.accepted)
        goals.append({"goal": f"phase {phase.name}: every message accepted, ticketed, attachment sha256 intact",
                      "value": f"{phase.accepted}/{phase.messages} accepted, {phase.attachments_intact} intact",
                      "passed": complete})
    return goals


def format_phase(phase: Phase) -> str:
    roles = ", ".join(f"{role} +{peak / MB:.1f} MB ({phase.multiple(role):.2f}x)"
                      for role, peak in sorted(phase.peak_above_idle.items()) if role != "other")
    last_250 = f"{phase.seconds_to_last_250:.1f} s" if phase.seconds_to_last_250 is not None else "-"
    tickets = f"{phase.seconds_to_tickets:.1f} s" if phase.seconds_to_tickets is not None else "INCOMPLETE"
    refused = f"; refused: {phase.refused}" if phase.refused else ""
    return (f"{phase.name}: accepted {phase.accepted}/{phase.messages} ({phase.deferred} deferred), last 250 after {last_250}, tickets after "
            f"{tickets}; peak above idle: {roles}; whole service peak {phase.tree_peak / MB:.1f} MB "
            f"(PSS {phase.tree_pss_peak / MB:.1f} MB), "
            f"{phase.most_tasks} threads; "
            f"attachments intact {phase.attachments_intact}/{phase.accepted}{refused}")


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attachment-size", type=parse_size, default=18 * 1024 * 1024,
                        help="bytes of each message's attachment before base64 (default 18m: a 25.8 MB message)")
    parser.add_argument("--messages", "-n", type=int, default=10, help="messages of the second phase (default 10)")
    parser.add_argument("--concurrency", "-c", type=int, default=4,
                        help="concurrent SMTP sessions of the second phase (default 4)")
    parser.add_argument("--timeout", type=float, default=900.0, help="hard limit in seconds for the run (default 900)")
    parser.add_argument("--encryption", action="store_true", help="intake with a storage key (encryption at rest)")
    parser.add_argument("--intake-env", type=parse_intake_env, action="append", default=[], metavar="INTAKE_X=VALUE",
                        help="an intake setting to override (repeatable)")
    parser.add_argument("--json", action="store_true", help="the results as JSON on stdout")
    args = parser.parse_args(argv)
    if not 1 <= args.messages <= 100 or not 1 <= args.concurrency <= args.messages:
        parser.error("--messages must be 1..100 and --concurrency 1..messages")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ServerFailed as exc:
        progress(f"server failed: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for goal in result["goals"]:
            print(f"{'PASS' if goal['passed'] else 'FAIL'}  {goal['goal']}: {goal['value']}")
    return 0 if all(goal["passed"] for goal in result["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
