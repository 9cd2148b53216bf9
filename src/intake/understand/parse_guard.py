"""Parsing bounded in time: :func:`intake.understand.parse.parse` in a long-lived helper process.

``parse`` bounds what it reads, but it runs on the stdlib email package, mail-parser and
html2text, whose worst cases we do not control (quadratic header parsing, gh-136063; deep
recursion). A thread cannot be stopped, a process can: the processor hands each message's bytes
to one helper process and waits at most *timeout* seconds. On timeout the helper is killed and
replaced, and the message gets a minimal ParsedMail from a cheap scan of its header block (the
raw bytes stay stored, so ``intake reprocess`` can try again).

The helper also scores each message by the low-quality rules (:mod:`intake.understand.quality`) and does its
text work (:mod:`intake.understand.text_work`: credit, maintainers' commands, trimming), the other pure-CPU
steps of preparing it: all run at the helper's low CPU priority, and none under the write lock.

Two bounds, measured differently. ``processing.message_budget`` is the CPU time (user + system,
of the helper: ``ITIMER_PROF``) that parsing, scoring and text work of one message may take
together; when it is spent the step under way stops, and the message goes on with what was done
and a warning saying what was not (parsing not finished: the header block only, as on a
timeout). ``processing.parse_timeout`` is wall-clock time the processor waits for the helper's
answer, the backstop for a helper starved of CPU (it runs at nice 19) or stuck in C code that no
signal interrupts: keep it above the budget.

The helper is started lazily (spawn, so it inherits no locks, threads or database connections
of the service), reused for every message, and replaced when it dies. Calls are serialised by a
lock: one helper parses one message at a time. Cost per message: one round trip over a pipe and
pickling the result: ~0.1 ms for a 4 KB mail on a 2-core machine, where parse itself takes ~0.36 ms.
The caller hands a message's *head* (intake's trace fields) apart from its bytes, and the helper
puts them together: the caller never holds a second copy of a 25 MB message for the parse.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from intake.processes import main_left_alone, return_large_buffers
from intake.understand import text_work
from intake.understand.parse import parse, parse_headers_only
from intake.understand.parsed_mail import ParsedMail
from intake.understand.pgp_inbound import Decryption
from intake.understand.quality_score import RuleSet
from intake.understand.text_work import TextWork

log = logging.getLogger(__name__)

PARSE_TIMEOUT = 10.0  # seconds one message may take
MESSAGE_BUDGET = 5.0  # seconds of the helper's CPU one message may take
STARTUP_TIMEOUT = 60.0  # seconds a new helper may take to import and report ready (not counted per message)
RETRY_AFTER = 60.0  # seconds to parse in-process, unbounded, after a helper failed to start
_READY = b"ready"


@dataclass(frozen=True)
class Result:
    """A message prepared: parsed, its low-quality score (None without rules), its text work, and
    the CPU seconds that took in the helper (0 when done in this process)."""

    mail: ParsedMail
    quality: dict[str, Any] | None
    work: TextWork
    cpu_seconds: float = 0.0


class _BudgetSpent(BaseException):
    """The message's CPU budget ran out (SIGPROF). Not an Exception: parse() catches those."""


def _budget_spent(signum: int, frame: object) -> None:
    raise _BudgetSpent


def _serve(connection: Connection, parse_function: Callable[[bytes], ParsedMail], rules: RuleSet | None,
           budget: float) -> None:
    """The helper's loop: a message in (its head's bytes, then the rest's; parsed together); out ("done", (ParsedMail, quality, TextWork, CPU seconds)),
    ("failed", error text) if parsing raised, or ("spent", CPU seconds) if the *budget* ran out
    before parsing was done. The quality (the low-quality score of *rules*, as a dict) is None
    without rules, or if scoring failed, and the text work None if it failed: the caller then does
    it itself, and meets the error there. A budget spent after parsing leaves the rest undone:
    quality ``{}``, an empty TextWork, and a warning on the mail."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    signal.signal(signal.SIGPROF, _budget_spent)
    _yield_cpu()
    return_large_buffers()
    connection.send_bytes(_READY)
    while True:
        try:
            head = connection.recv_bytes()
            raw = head + connection.recv_bytes() if head else connection.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the pipe or went away
        connection.send(_prepare_within(raw, parse_function, rules, budget))
        del raw  # not kept while waiting for the next message


def _prepare_within(raw: bytes, parse_function: Callable[[bytes], ParsedMail], rules: RuleSet | None,
                    budget: float) -> tuple[str, Any]:
    """Parse, score and read *raw* within *budget* CPU seconds (see :func:`_serve`)."""
    started = time.process_time()
    mail: ParsedMail | None = None
    quality: dict[str, Any] | None = None
    work: TextWork | None = None
    step = "parsing"
    try:
        # One-shot: once it fired it cannot fire again, whichever line it interrupted.
        signal.setitimer(signal.ITIMER_PROF, budget)
        try:
            try:
                mail = parse_function(raw)
            except Exception as exc:  # noqa: BLE001 - report it; the parent falls back
                return "failed", f"{type(exc).__name__}: {exc}"
            step = "scoring"
            try:
                quality = rules.score(mail).as_dict() if rules is not None else None
            except Exception:  # noqa: BLE001 - see _serve
                quality = None
            step = "reading credit and commands"
            try:
                work = text_work.read(mail.body_text)
            except Exception:  # noqa: BLE001 - see _serve
                work = None
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    except _BudgetSpent:
        spent = time.process_time() - started
        if mail is None:
            return "spent", spent
        mail.warnings.append(f"processing budget ({budget:g} s of CPU) spent while {step}: "
                             f"{'not scored; ' if step == 'scoring' else ''}credit and commands not read")
        return "done", (mail, {} if step == "scoring" else quality, TextWork(), spent)
    return "done", (mail, quality, work, time.process_time() - started)


def _yield_cpu() -> None:
    """Lower this process's CPU priority: nice 19, and on Linux the batch policy (waking up, it
    does not preempt others).

    Parsing is the processor's largest CPU cost and holds no lock; when the listener and the
    processor want the same core, the listener's 250s should come first. (The worker itself
    yields less: see :func:`intake.run.worker._yield_cpu_to_listener`.) Unlike the idle policy,
    this keeps a share of the CPU under any load, so parsing never stops."""
    try:
        os.nice(19 - os.nice(0))
        if hasattr(os, "SCHED_BATCH"):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:  # a sandbox that forbids it: parse at the priority we have
        log.warning("event=parse-helper-priority-unchanged error=%s", exc)


class HelperUnavailable(Exception):
    """The helper process could not be started or did not report ready."""


class _Helper:
    """One helper process and our end of its pipe."""

    def __init__(self, parse_function: Callable[[bytes], ParsedMail], rules: RuleSet | None, budget: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child_end = context.Pipe(duplex=True)
        self.process = context.Process(target=_serve, args=(child_end, parse_function, rules, budget), daemon=True,
                                       name="intake-parse-helper")
        with main_left_alone():
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
    """Parses messages in a reusable helper process, each within a time bound and a CPU *budget*,
    and scores them with *rules* and does their text work there too (the helper runs at a low
    CPU priority; all of it is pure CPU).

    *parse_function* must be picklable (a module-level function); tests pass a slow one.
    """

    def __init__(self, parse_function: Callable[[bytes], ParsedMail] = parse, rules: RuleSet | None = None,
                 budget: float = MESSAGE_BUDGET) -> None:
        self._parse_function = parse_function
        self.rules = rules
        self.budget = budget
        self._helper: _Helper | None = None
        self._lock = threading.Lock()
        self._unavailable: tuple[float, str] | None = None  # (retry at, monotonic clock; why)

    def parse(self, raw: bytes, timeout: float = PARSE_TIMEOUT) -> ParsedMail:
        """*raw* parsed within *timeout* seconds, or a header-only ParsedMail saying why not."""
        return self.parse_and_score(raw, timeout).mail

    def parse_and_score(self, raw: bytes, timeout: float = PARSE_TIMEOUT, head: bytes = b"") -> Result:
        """As :meth:`parse` (of *head* + *raw*: see the module's docstring), and the mail's
        low-quality score by the rules (None without rules) and its text work. What the helper
        could not do (it failed there, or there is no helper) is done here, without a bound: it
        is linear (RE2, see :mod:`intake.patterns`)."""
        result = self._parse(_Message(head, raw), timeout)
        if result.quality is None and self.rules is not None:
            result = replace(result, quality=self.rules.score(result.mail).as_dict())
        return result

    def _parse(self, message: _Message, timeout: float) -> Result:
        with self._lock:
            if self._unavailable and time.monotonic() < self._unavailable[0]:
                return self._parse_unbounded(message.whole(), self._unavailable[1])
            try:
                helper = self._ready_helper()
            except (HelperUnavailable, OSError) as exc:
                log.error("event=parse-helper-unavailable retry_after=%g error=%s", RETRY_AFTER, exc)
                self._discard(kill=True)
                self._unavailable = (time.monotonic() + RETRY_AFTER, str(exc))
                return self._parse_unbounded(message.whole(), str(exc))
            self._unavailable = None
            return self._round_trip(helper, message, timeout)

    def close(self) -> None:
        """Stop the helper (a later parse starts a new one)."""
        with self._lock:
            self._discard(kill=False)

    def _parse_unbounded(self, raw: bytes, reason: str) -> Result:
        """Without a helper there is no time bound, but the message is still read rather than lost."""
        mail = self._parse_function(raw)
        mail.warnings.append(f"parse helper unavailable ({reason}); parsed without a time bound")
        return Result(mail, None, text_work.read(mail.body_text))

    def _ready_helper(self) -> _Helper:
        if self._helper is None:
            self._helper = _Helper(self._parse_function, self.rules, self.budget)
        self._helper.wait_ready()
        return self._helper

    def _round_trip(self, helper: _Helper, message: _Message, timeout: float) -> Result:
        try:
            helper.connection.send_bytes(message.head)
            helper.connection.send_bytes(message.raw)
            reply = helper.connection.recv() if helper.connection.poll(timeout) else None
        except (EOFError, OSError) as exc:
            log.error("event=parse-helper-died exit_code=%s", helper.process.exitcode)
            self._replace()
            return _headers_only(message.whole(), f"parse helper died ({type(exc).__name__}); "
                                                  "only the header block was read")
        if reply is None:
            log.warning("event=parse-timeout seconds=%g bytes=%d", timeout, message.size)
            self._replace()
            return _headers_only(message.whole(), f"parse timed out after {timeout:g} s")
        outcome, result = reply
        if outcome == "failed":
            return _headers_only(message.whole(), f"parse failed in the helper ({result}); "
                                                  "only the header block was read")
        if outcome == "spent":
            log.warning("event=message-budget-spent cpu_seconds=%.3f bytes=%d", result, message.size)
            return _headers_only(message.whole(), f"processing budget ({self.budget:g} s of CPU) spent while "
                                                  "parsing; only the header block was read", result)
        mail, quality, work, cpu_seconds = result
        return Result(mail, quality, work if work is not None else text_work.read(mail.body_text), cpu_seconds)

    def _replace(self) -> None:
        """Kill the helper and start its successor now, so it imports while we carry on."""
        self._discard(kill=True)
        try:
            self._helper = _Helper(self._parse_function, self.rules, self.budget)
        except OSError as exc:  # the next parse tries again
            log.error("event=parse-helper-restart-failed error=%s", exc)

    def _discard(self, kill: bool) -> None:
        if self._helper is not None:
            self._helper.stop(kill)
            self._helper = None


@dataclass(frozen=True)
class _Message:
    """A message to parse: *head* (intake's trace fields, or nothing) on top of *raw*."""

    head: bytes
    raw: bytes

    @property
    def size(self) -> int:
        return len(self.head) + len(self.raw)

    def whole(self) -> bytes:
        """The message in one piece, for parsing here (a copy when there is a head)."""
        return self.head + self.raw if self.head else self.raw


def _headers_only(raw: bytes, warning: str, cpu_seconds: float = 0.0) -> Result:
    """The header block's mail when parsing did not finish: not scored (quality None: the caller
    scores the little there is), no text to read."""
    return Result(parse_headers_only(raw, warning), None, TextWork(), cpu_seconds)


_shared: BoundedParser | None = None
_shared_for: tuple[RuleSet, float, Decryption | None] | None = None  # what the shared helper was made for
_shared_lock = threading.Lock()


def parse_and_score(raw: bytes, rules: RuleSet, timeout: float = PARSE_TIMEOUT,
                    budget: float = MESSAGE_BUDGET, decryption: Decryption | None = None, head: bytes = b"") -> Result:
    """:func:`intake.understand.parse.parse` of *head* + *raw* (put together in the helper: see the
    module's docstring) in the shared helper process, bounded by *timeout* seconds of
    wall time and *budget* seconds of CPU, the mail's low-quality score by *rules*
    (``SpamScore.as_dict()``) and its text work. With *decryption* (the organisation's OpenPGP
    key, handed to the helper as bytes) encrypted reports are decrypted there, within the same
    bounds. A process works by one configuration's rules, budget and key: others restart the helper."""
    global _shared, _shared_for
    with _shared_lock:
        if _shared is None or _shared_for != (rules, budget, decryption):
            if _shared is not None:
                _shared.close()
            parse_function = functools.partial(parse, decryption=decryption) if decryption else parse
            _shared, _shared_for = BoundedParser(parse_function, rules=rules, budget=budget), (rules, budget, decryption)
        parser = _shared
    return parser.parse_and_score(raw, timeout, head)


def close() -> None:
    """Stop the shared helper process (at service shutdown)."""
    if _shared is not None:
        _shared.close()
