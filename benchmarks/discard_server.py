"""The benchmark's baseline: a bare aiosmtpd server that answers every DATA with 250 and keeps nothing.

It runs as its own process, with the aiosmtpd settings intake's listener uses and the server in
the main event loop as intake's is, so that ``throughput.py`` compares what intake does with a
message against nothing at all.

    python benchmarks/discard_server.py PORT

It binds 127.0.0.1 only, prints ``event=listening`` on stderr once bound, and exits on SIGTERM
or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
# intake's shipped [smtp] values, so both servers announce and enforce the same limits.
MAX_MESSAGE_SIZE = 25 * 1024 * 1024
IDLE_TIMEOUT = 60


class DiscardHandler:
    """Accepts every message without looking at it."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


def make_smtp() -> SMTP:
    return SMTP(
        DiscardHandler(),
        data_size_limit=MAX_MESSAGE_SIZE,
        enable_SMTPUTF8=True,
        decode_data=False,
        hostname="localhost",
        ident="discard",
        timeout=IDLE_TIMEOUT,
    )


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(make_smtp, host=HOST, port=port, reuse_address=True)
    print(f"event=listening address={HOST}:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="TCP port to listen on (127.0.0.1)")
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
