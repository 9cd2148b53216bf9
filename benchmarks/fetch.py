"""How fast intake fetches from a hosted IMAP mailbox: a private Dovecot on loopback (the tests'
``tests/dovecot_harness.py``: Debian's dovecot-imapd, run as root), N messages put into its
INBOX, then one ``intake.receive.fetch.fetch_once`` pass into a fresh SQLite database (WAL,
synchronous=FULL): messages stored per second, connection, TLS and marking included.

    sudo .venv/bin/python benchmarks/fetch.py             # N=1000, 4 KB, after = "seen"
    sudo .venv/bin/python benchmarks/fetch.py -n 200 --after delete --json

Only 127.0.0.1 is contacted; the pass is bounded by --timeout; the Dovecot is stopped and its
folder removed at the end. (``throughput.py --modes smtp,import,fetch`` puts the fetch rate,
processing included, beside the SMTP and import rates; the setup is shared: ``intake_modes.py``.)
Exit status: 0 measured, 1 not every message was stored, 2 no Dovecot could run here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from intake_modes import DovecotUnavailable, fetch_pass, fetch_source, free_port, intake_settings, start_dovecot

RECIPIENT = "security@example.com"


def _message(number: int, size: int) -> bytes:
    head = (b"From: Alice <alice@researcher.test>\r\nTo: security@example.com\r\n"
            b"Subject: report %d\r\nMessage-ID: <bench-%d@researcher.test>\r\n\r\n" % (number, number))
    return head + (b"x" * 76 + b"\r\n") * max(1, size // 78)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=1000)
    parser.add_argument("-s", "--size", type=int, default=4096, help="body bytes (default 4096)")
    parser.add_argument("--after", default="seen", help='"seen", "move:<folder>" or "delete"')
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the pass may take (default 300)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        dovecot = start_dovecot(free_port())
    except DovecotUnavailable as exc:
        print(f"no Dovecot: {exc}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="intake-bench-fetch-"))
    try:
        for start in range(0, args.messages, 200):
            dovecot.append([_message(n, args.size) for n in range(start, min(start + 200, args.messages))])
        with intake_settings(work, RECIPIENT, fetch_source(dovecot, work, args.after)) as settings:
            started = time.monotonic()
            result = fetch_pass(settings, started + args.timeout)
            seconds = time.monotonic() - started
    finally:
        dovecot.stop()
        dovecot.remove()
        shutil.rmtree(work, ignore_errors=True)
    figures = {"messages": args.messages, "size": args.size, "after": args.after, "stored": result.stored,
               "seconds": round(seconds, 3), "msg_per_s": round(result.stored / seconds, 1)}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"fetch: {result.stored}/{args.messages} messages of {args.size} B stored in {seconds:.2f} s "
              f"= {figures['msg_per_s']:.0f} msg/s (after = {args.after})")
    return 0 if result.stored == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
