"""`intake serve` at its memory limit: a message the listener has no memory for is a 4xx, never a
lost 250 nor a listener that stops answering; a worker killed (as the kernel does at the unit's
``MemoryMax=``) leaves the listener answering."""

from __future__ import annotations

import os
import re
import resource
import signal
import smtplib
import threading
import urllib.request
from pathlib import Path

import pytest

import test_serve
from conftest import free_port
from test_large_mail import send, wait_until
from test_listener import message_bytes
from test_serve import _query

serve, serve_env = test_serve.serve, test_serve.serve_env  # fixtures

pytestmark = pytest.mark.slow
MIB = 1024 * 1024


def large_message(marker: str, size: int) -> bytes:
    """A CRLF message of about *size* bytes with *marker* (test_listener's message_bytes, in one go)."""
    head = message_bytes(marker)
    return head + (b"x" * 70 + b"\r\n") * ((size - len(head)) // 72)


def _status_field(pid: int, field: str) -> int:
    """A /proc/PID/status figure in bytes (VmSize, VmRSS, ...) or as a count (Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            value = line.split()[1:]
            return int(value[0]) * (1024 if value[1:] == ["kB"] else 1)
    raise AssertionError(f"no {field} for {pid}")


def _markers(database: str) -> list[str]:
    """The marker of every stored message, once per stored row."""
    return [re.search(rb"marker (\S+)", bytes(raw)).group(1).decode()
            for (raw,) in _query(database, "SELECT raw FROM inbound_raw ORDER BY id")]


def _metric(port: int, result: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.search(r'^intake_messages_received_total\{result="%s"\} (\S+)$' % re.escape(result), text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_burst_of_large_mail_under_an_address_space_limit_is_stored_or_deferred_and_the_listener_goes_on(
        serve, serve_env):
    metrics_port = free_port()
    serve_env["INTAKE_METRICS__LISTEN"] = f"127.0.0.1:{metrics_port}"
    server = serve()
    server.start()
    assert send(server.port, large_message("warm", 2 * MIB))[0] == 250
    pid = server.process.pid  # the listener (the worker is a child of its own, not limited here)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # The listener may have 16 MiB more address space than it has now: less than two of the eight
    # 8 MiB messages sent at once take to store (each is read back whole and copied by SQLite).
    limit = _status_field(pid, "VmSize") + 16 * MIB
    try:
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError) as exc:
        pytest.skip(f"cannot set RLIMIT_AS of the listener here: {exc!r}")

    markers = [f"burst{n}" for n in range(8)]
    replies: dict[str, int] = {}
    start = threading.Barrier(len(markers))

    def client(marker: str) -> None:
        start.wait(30)
        replies[marker] = send(server.port, large_message(marker, 8 * MIB))[0]

    threads = [threading.Thread(target=client, args=(marker,)) for marker in markers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(replies) == len(markers) and set(replies.values()) <= {250, 451, 452}, replies
    refused = [marker for marker, code in replies.items() if code != 250]
    assert refused, f"the limit never bit: {replies}"
    # Still answering under the limit, and refusals were logged and counted with their reason.
    assert send(server.port, message_bytes("small-after", 1000))[0] == 250
    log = server.log.read_text()
    assert log.count("event=data-refused") + log.count("event=store-failed") >= len(refused), log[-3000:]
    # The metrics endpoint answers with little room left (less than a thread's 8 MiB stack: it
    # once started a thread per request, which failed just when the metrics mattered), and counts
    # the refusals with their reason.
    resource.prlimit(pid, resource.RLIMIT_AS, (_status_field(pid, "VmSize") + 2 * MIB, hard))
    assert _metric(metrics_port, "out-of-memory") + _metric(metrics_port, "store-failed") >= len(refused)
    resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))
    # Each client's retry of what was refused is taken.
    for marker in refused:
        assert send(server.port, large_message(marker, 8 * MIB))[0] == 250, marker
    stored = _markers(serve_env["INTAKE_DATABASE__URL"])
    assert sorted(stored) == sorted(["warm", *markers, "small-after"]), "each 250 stored exactly once"
    assert server.process.poll() is None
    assert server.stop() == 0


def test_a_worker_killed_while_it_waits_for_mail_leaves_the_listener_answering(serve, serve_env, sink):
    # A long poll: the worker spends its time waiting to be woken by the listener's next commit,
    # which is where the kernel's OOM killer (or kill -9) finds it.
    serve_env["INTAKE_PROCESSING__POLL_INTERVAL"] = "60"
    server = serve()
    server.start()
    wait_until(lambda: "event=worker-ready" in server.log.read_text())
    assert send(server.port, message_bytes("before", 1000))[0] == 250
    database = serve_env["INTAKE_DATABASE__URL"]
    sink.wait_for(1)  # its acknowledgement sent: the worker has nothing left to do and waits to be woken
    [worker] = [int(pid) for pid in re.findall(r"event=worker-started pid=(\d+)", server.log.read_text())]
    os.kill(worker, signal.SIGKILL)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            refused = client.sendmail("alice@researcher.test", ["security@example.com"],
                                      message_bytes("after-kill", 1000))
    except (smtplib.SMTPException, OSError) as exc:  # with multiprocessing.Event: no answer, ever
        pytest.fail(f"the listener stopped answering after its worker was killed: {exc!r}")
    assert refused == {}
    assert sorted(_markers(database)) == ["after-kill", "before"]
    # The worker is replaced and the message processed.
    wait_until(lambda: len(re.findall(r"event=worker-started", server.log.read_text())) == 2)
    wait_until(lambda: ("pending",) not in _query(database, "SELECT status FROM inbound_message"), 60)
    assert server.stop() == 0
