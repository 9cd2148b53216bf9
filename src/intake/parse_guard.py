"""Parsing bounded in time: :func:`intake.parse.parse` in a long-lived helper process.

``parse`` bounds what it reads, but it runs on the stdlib email package, mail-parser and
html2text, whose worst cases we do not control (quadratic header parsing, gh-136063; deep
recursion). A thread cannot be stopped, a process can: the processor hands each message's bytes
to one helper process and waits at most *timeout* seconds. On timeout the helper is killed and
replaced, and the message gets a minimal ParsedMail from a cheap scan of its header block (the
raw bytes stay stored, so ``intake reprocess`` can try again).

The helper also scores each message by the low-quality rules (:mod:`intake.spam`), the other
pure-CPU step of preparing it: both then run at the helper's low CPU priority.

The helper is started lazily (spawn, so it inherits no locks, threads or database connections
of the service), reused for every message, and replaced when it dies. Calls are serialised by a
lock: one helper parses one message at a time. Cost per message: one round trip over a pipe and
pickling the result: ~0.1 ms for a 4 KB mail on a 2-core machine, where parse itself takes ~0.36 ms.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from multiprocessing.connection import Connection
from typing import Any

from intake.parse import ParsedMail, parse, parse_headers_only
from intake.spam import RuleSet

log = logging.getLogger(__name__)

PARSE_TIMEOUT = 10.0  # seconds one message may take
STARTUP_TIMEOUT = 60.0  # seconds a new helper may take to import and report ready (not counted per message)
RETRY_AFTER = 60.0  # seconds to parse in-process, unbounded, after a helper failed to start
_READY = b"ready"


def _serve(connection: Connection, parse_function: Callable[[bytes], ParsedMail], rules: RuleSet | None) -> None:
    """The helper's loop: raw bytes in, (True, (ParsedMail, quality)) or (False, error text) out.
    The quality (the low-quality score of *rules*, as a dict) is None without rules, or if scoring
    failed: the caller then scores the mail itself, and meets the error there."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    _yield_cpu()
    connection.send_bytes(_READY)
    while True:
        try:
            raw = connection.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the pipe or went away
        try:
            mail = parse_function(raw)
        except Exception as exc:  # noqa: BLE001 - report it; the parent falls back
            connection.send((False, f"{type(exc).__name__}: {exc}"))
            continue
        try:
            quality = rules.score(mail).as_dict() if rules is not None else None
        except Exception:  # noqa: BLE001 - see the docstring
            quality = None
        connection.send((True, (mail, quality)))


def _yield_cpu() -> None:
    """Lower this process's CPU priority: nice 19, and on Linux the batch policy (waking up, it
    does not preempt others).

    Parsing is the processor's largest CPU cost and holds no lock; when the listener and the
    processor want the same core, the listener's 250s should come first. (The worker itself
    yields less: see :func:`intake.service._yield_cpu_to_listener`.) Unlike the idle policy,
    this keeps a share of the CPU under any load, so parsing never stops."""
    try:
        os.nice(19 - os.nice(0))
        if hasattr(os, "SCHED_BATCH"):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:  # a sandbox that forbids it: parse at the priority we have
        log.warning("event=parse-helper-priority-unchanged error=%s", exc)


@contextmanager
def _main_left_alone() -> Iterator[None]:
    """Start a spawned process without running our main script again in it.

    spawn re-runs the parent's ``__main__`` script in the child (to find what it defines); under
    ``intake serve`` that is the console script, which imports the whole CLI: 2.7 s on a slow
    2-core machine, against 0.6 s for what the helper needs. A main module named as a package's
    ``__main__`` is left alone (``multiprocessing.spawn._fixup_main_from_name``), so for the start
    it is named so. Nothing the helper runs is defined in the main script."""
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is not None:  # run with -m: spawn decides by that name already
        yield
        return
    main.__spec__ = ModuleSpec("intake.__main__", None)
    try:
        yield
    finally:
        main.__spec__ = None


class HelperUnavailable(Exception):
    """The helper process could not be started or did not report ready."""


class _Helper:
    """One helper process and our end of its pipe."""

    def __init__(self, parse_function: Callable[[bytes], ParsedMail], rules: RuleSet | None) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(child_end, parse_function, rules), daemon=True,
                                       name="intake-parse-helper")
        with _main_left_alone():
            self.process.start()
        child_end.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        try:
            if not self.connection.poll(STARTUP_TIMEOUT) or self.connection.recv_bytes() != _READY:
                raise HelperUnavailable(f"no ready signal within {STARTUP_TIMEOUT:g} s")
        except (EOFError, OSError) as exc:
            raise HelperUnavailable(f"helper exited while starting (exit code {self.process.exitcode})") from exc
        self.ready = True

    def stop(self, kill: bool) -> None:
        """Kill (a stuck helper) or let it exit by closing the pipe (shutdown)."""
        if kill:
            self.process.kill()
        self.connection.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class BoundedParser:
    """Parses messages in a reusable helper process, each within a time bound, and scores them
    with *rules* there too (the helper runs at a low CPU priority; scoring is pure CPU).

    *parse_function* must be picklable (a module-level function); tests pass a slow one.
    """

    def __init__(self, parse_function: Callable[[bytes], ParsedMail] = parse, rules: RuleSet | None = None) -> None:
        self._parse_function = parse_function
        self.rules = rules
        self._helper: _Helper | None = None
        self._lock = threading.Lock()
        self._unavailable: tuple[float, str] | None = None  # (retry at, monotonic clock; why)

    def parse(self, raw: bytes, timeout: float = PARSE_TIMEOUT) -> ParsedMail:
        """*raw* parsed within *timeout* seconds, or a header-only ParsedMail saying why not."""
        return self.parse_and_score(raw, timeout)[0]

    def parse_and_score(self, raw: bytes, timeout: float = PARSE_TIMEOUT) -> tuple[ParsedMail, dict[str, Any] | None]:
        """As :meth:`parse`, and the mail's low-quality score by the rules (None without rules).
        Scoring is not time-bounded: the rules are linear (see :mod:`intake.spam`)."""
        mail, quality = self._parse(raw, timeout)
        if quality is None and self.rules is not None:
            quality = self.rules.score(mail).as_dict()
        return mail, quality

    def _parse(self, raw: bytes, timeout: float) -> tuple[ParsedMail, dict[str, Any] | None]:
        with self._lock:
            if self._unavailable and time.monotonic() < self._unavailable[0]:
                return self._parse_unbounded(raw, self._unavailable[1])
            try:
                helper = self._ready_helper()
            except (HelperUnavailable, OSError) as exc:
                log.error("event=parse-helper-unavailable retry_after=%g error=%s", RETRY_AFTER, exc)
                self._discard(kill=True)
                self._unavailable = (time.monotonic() + RETRY_AFTER, str(exc))
                return self._parse_unbounded(raw, str(exc))
            self._unavailable = None
            return self._round_trip(helper, raw, timeout)

    def close(self) -> None:
        """Stop the helper (a later parse starts a new one)."""
        with self._lock:
            self._discard(kill=False)

    def _parse_unbounded(self, raw: bytes, reason: str) -> tuple[ParsedMail, None]:
        """Without a helper there is no time bound, but the message is still read rather than lost."""
        mail = self._parse_function(raw)
        mail.warnings.append(f"parse helper unavailable ({reason}); parsed without a time bound")
        return mail, None

    def _ready_helper(self) -> _Helper:
        if self._helper is None:
            self._helper = _Helper(self._parse_function, self.rules)
        self._helper.wait_ready()
        return self._helper

    def _round_trip(self, helper: _Helper, raw: bytes, timeout: float) -> tuple[ParsedMail, dict[str, Any] | None]:
        try:
            helper.connection.send_bytes(raw)
            reply = helper.connection.recv() if helper.connection.poll(timeout) else None
        except (EOFError, OSError) as exc:
            log.error("event=parse-helper-died exit_code=%s", helper.process.exitcode)
            self._replace()
            return parse_headers_only(raw, f"parse helper died ({type(exc).__name__}); only the header block was read"), None
        if reply is None:
            log.warning("event=parse-timeout seconds=%g bytes=%d", timeout, len(raw))
            self._replace()
            return parse_headers_only(raw, f"parse timed out after {timeout:g} s"), None
        ok, result = reply
        if not ok:
            return parse_headers_only(raw, f"parse failed in the helper ({result}); only the header block was read"), None
        return result

    def _replace(self) -> None:
        """Kill the helper and start its successor now, so it imports while we carry on."""
        self._discard(kill=True)
        try:
            self._helper = _Helper(self._parse_function, self.rules)
        except OSError as exc:  # the next parse tries again
            log.error("event=parse-helper-restart-failed error=%s", exc)

    def _discard(self, kill: bool) -> None:
        if self._helper is not None:
            self._helper.stop(kill)
            self._helper = None


_shared: BoundedParser | None = None
_shared_lock = threading.Lock()


def parse_and_score(raw: bytes, rules: RuleSet, timeout: float = PARSE_TIMEOUT) -> tuple[ParsedMail, dict[str, Any]]:
    """:func:`intake.parse.parse` in the shared helper process, bounded by *timeout* seconds, and
    the mail's low-quality score by *rules* (``SpamScore.as_dict()``). A process scores by one
    configuration's rules: other rules restart the helper."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.rules != rules:
            if _shared is not None:
                _shared.close()
            _shared = BoundedParser(rules=rules)
        parser = _shared
    return parser.parse_and_score(raw, timeout)  # type: ignore[return-value]  # has rules: scored


def close() -> None:
    """Stop the shared helper process (at service shutdown)."""
    if _shared is not None:
        _shared.close()
