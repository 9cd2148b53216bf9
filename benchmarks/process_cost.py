"""CPU that processing and sending cost per message, in one process (not a test).

Stores N 4 KB benchmark reports (as throughput.py builds them) in a fresh SQLite file, then runs
``processor.process_all`` and the outbox sender (to a Maildir) over them, and prints the CPU time
of each phase. Run it under callgrind at two sizes to count instructions per message without the
start-up cost:

    .venv/bin/python benchmarks/process_cost.py -n 400
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.400 .venv/bin/python benchmarks/process_cost.py -n 400
    .venv/bin/python benchmarks/process_cost.py -n 400 --profile /tmp/process.prof
    .venv/bin/python benchmarks/process_cost.py -n 400 --batch 2   # mail arriving a few at a time

``--batch N`` claims and acts on N messages at a time (``processing.batch_size`` and
``messages_per_transaction``), as a worker keeping up with mail that trickles in does: then the
cost per batch and per transaction weighs on every message.

DNS is a fixed resolver with no records (as in the tests): nothing leaves the machine. Only a
temporary folder is written.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import build_message, make_body  # noqa: E402

from intake.config.settings import load_settings  # noqa: E402
from intake.run import processor  # noqa: E402
from intake.send.outbox import OutboxSender, make_transport  # noqa: E402
from intake.store import inbound, schema  # noqa: E402
from intake.store.db import make_engine  # noqa: E402
from intake.tickets import undeliverable  # noqa: E402
from intake.understand import dns_lookups  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def _send_all(engine, settings, now: datetime) -> int:  # type: ignore[no-untyped-def]
    sender = OutboxSender(engine, settings, make_transport(settings), on_undelivered=undeliverable.record)

    async def drain() -> int:
        sent = 0
        for _ in range(100_000):
            counts = await sender.send_due(now)
            if not counts:
                break
            sent += sum(counts.values())
        return sent

    return asyncio.run(drain())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=400)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--profile", help="write a cProfile of processing and sending to this file")
    parser.add_argument("--batch", type=int, help="messages per batch and per transaction (default: config.toml's)")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="intake-process-cost-"))
    try:
        shutil.copy(ROOT / "config.toml", directory / "config.toml")
        for key in [k for k in os.environ if k.startswith("INTAKE_")]:
            del os.environ[key]
        os.environ["INTAKE_DATABASE__URL"] = f"sqlite:///{directory / 'intake.db'}"
        os.environ["INTAKE_OUTBOUND__MAILDIR"] = str(directory / "outbox")
        if args.batch:
            os.environ["INTAKE_PROCESSING__BATCH_SIZE"] = str(args.batch)
            os.environ["INTAKE_PROCESSING__MESSAGES_PER_TRANSACTION"] = str(args.batch)
        settings = load_settings(directory / "config.toml")
        resolver = dns_lookups.StaticResolver()
        dns_lookups.system_resolver = lambda config: resolver  # no real DNS
        engine = make_engine(settings.database_url, settings.database.busy_timeout)
        schema.upgrade(engine)
        body = make_body(args.size)
        arrivals = [inbound.Arrival(mail_from=m.sender, rcpt_tos=["security@example.com"], peer="127.0.0.1",
                                    helo="client.test", raw=m.raw, received_at=NOW)
                    for m in (build_message("cost", index, body) for index in range(args.messages))]
        inbound.store(engine, arrivals)
        profile = cProfile.Profile(time.process_time) if args.profile else None
        started = time.process_time()
        if profile:
            profile.enable()
        result = processor.process_all(engine, settings, NOW + timedelta(seconds=1))
        processed = time.process_time()
        sent = _send_all(engine, settings, NOW + timedelta(seconds=2))
        done = time.process_time()
        if profile:
            profile.disable()
            profile.dump_stats(args.profile)
        n = args.messages
        print(f"{n} messages: processing {(processed - started) / n * 1e3:.2f} ms CPU/message, "
              f"sending {sent} mails {(done - processed) / n * 1e3:.2f} ms CPU/message ({dict(result.decisions)})")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
