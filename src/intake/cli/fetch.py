"""``intake fetch``: take mail from the ``[[fetch]]`` IMAP sources into the raw store, once (cron,
tests) or until stopped."""

from __future__ import annotations

import signal
import threading
import time

import click

from intake.cli.common import Context, fail
from intake.display import echo


@click.command("fetch")
@click.option("--source", "names", multiple=True, metavar="NAME",
              help="Only this [[fetch]] source (repeatable); default: every one.")
@click.option("--once", is_flag=True, help="One pass over each source, then exit (for cron and tests).")
@click.pass_obj
def fetch_command(obj: Context, names: tuple[str, ...], once: bool) -> None:
    """Store the mail waiting in the [[fetch]] IMAP mailboxes, then mark it seen, move or delete it
    there (as each source's `after` says). `intake serve` processes what was stored."""
    from intake.receive import fetch

    settings = obj.settings
    known = {source.name: source for source in settings.fetch}
    unknown = [name for name in names if name not in known]
    if unknown:
        fail(f"no [[fetch]] source named {', '.join(unknown)} (configured: {', '.join(known) or 'none'})", 2)
    sources = [known[name] for name in names] if names else list(known.values())
    if not sources:
        fail("no [[fetch]] sources are configured")
    engine = obj.engine()
    if not once:
        # The service's fetch threads, on the chosen sources, until SIGTERM or Ctrl-C.
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        fetchers = fetch.Fetchers(settings.model_copy(update={"fetch": sources}), engine, lambda count: None)
        try:
            while not stop.is_set():
                stop.wait(1)
        except KeyboardInterrupt:
            pass
        fetchers.stop(settings.service.shutdown_grace)
        return
    failed = []
    for source in sources:
        started = time.monotonic()
        try:
            result = fetch.fetch_once(settings, source, engine)
        except fetch.FetchError as exc:
            echo(f"{source.name}: failed: {type(exc).__name__}: {exc}", err=True)
            failed.append(source.name)
            continue
        seconds = time.monotonic() - started
        echo(f"{source.name}: {result.found} waiting, {result.stored} stored, {result.duplicates} stored before, "
             f"{result.marked} marked {source.after}, {result.vanished} gone meanwhile, {result.too_big} too big "
             f"({result.found / seconds if seconds else 0:.0f} messages/s)")
    if failed:
        fail(f"fetch failed for {', '.join(failed)} (stored mail stays stored; the next pass goes on)")
