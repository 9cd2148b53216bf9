"""The listener's way into the raw store: one writer thread commits arrivals in groups, and no
client waits for it longer than ``smtp.store_timeout``.

Each accepted DATA is queued and the writer commits whatever has queued while the previous commit
ran, in one transaction (one fsync), then answers every waiter. There is no fixed wait window: an
idle server commits a lone message at once, a busy one shares each fsync among many messages.

A waiter waits at most its time limit, then hears :class:`StoreTimeout` (the listener answers
``451``: the client keeps the message and retries), so a database or disk that hangs costs
clients a retry, never a session held for ever. A message whose waiter gave up is

* dropped if the writer had not taken it up yet: it got its 451, its retry is the copy that counts;
* stored all the same if it was in the commit that hung, once that commit lands (a transaction
  is not taken back half-way; ``event=stored-after-timeout`` names it). The client's retry is
  then stored too, and processing finds that second copy a duplicate of the first (same
  Message-ID, else same bytes: :func:`intake.understand.lookups.message_key`): one ticket, one
  acknowledgement.

While a commit has run longer than the time limit the store is stuck (:meth:`GroupCommitter.stalled`):
new DATA gets its 451 at once rather than queue behind it, so the queue, whose bytes the
listener's memory budget stops counting once their waiters are gone, does not grow while it
hangs. ``intake serve`` logs it, says so on /readyz and /metrics and stops its systemd watchdog
pings (see :mod:`intake.run.service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine

from intake.store.db import checkpoint, is_sqlite, wal_size
from intake.store.inbound import Arrival, store

log = logging.getLogger(__name__)


class StoreTimeout(TimeoutError):
    """No commit answered within the waiter's time limit, or the store was stuck already."""


Waiter = tuple[Arrival, asyncio.AbstractEventLoop, "asyncio.Future[int]"]


class GroupCommitter:
    """A writer thread that stores queued arrivals, many per commit, and answers their waiters."""

    def __init__(self, engine: Engine, on_commit: Callable[[], None] = lambda: None, max_batch: int = 256,
                 wal_limit: int | None = None):
        """*wal_limit*: on SQLite, checkpoint when the WAL file has grown past this many bytes (see
        :meth:`_bound_wal`); None leaves checkpoints to others."""
        self._engine = engine
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._wal_limit = wal_limit if is_sqlite(engine) else None
        self._unmeasured = 0  # bytes committed since the WAL's size was last looked at
        # When (time.monotonic) the writer took up the batch it is on now; None between batches.
        self._batch_started: float | None = None
        self._queue: queue.SimpleQueue[Waiter | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inbound-commit", daemon=True)
        self._thread.start()

    async def store(self, arrival: Arrival, timeout: float) -> int:
        """Return the stored id once the message is committed; raises if the commit failed, and
        :class:`StoreTimeout` if none answered within *timeout* seconds (at once if the commit in
        progress has run longer than that already)."""
        stalled = self.stalled()
        if stalled > timeout:
            raise StoreTimeout(f"the store is stuck: its commit has run {stalled:.0f} s (limit {timeout:g} s)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.put((arrival, loop, future))
        give_up = loop.call_later(timeout, _give_up, future, timeout)
        try:
            return await future
        finally:
            give_up.cancel()

    def stalled(self) -> float:
        """Seconds the writer has been on its current batch (0 between batches): how long a
        message queued now would wait at least. A writer that died mid-batch stalls for ever."""
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    def close(self, timeout: float | None = None) -> bool:
        """Commit everything already queued, then stop the writer thread; False if it is still on
        a commit after *timeout* seconds (a hung one: its messages got 451, none of them a 250)."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch: list[Waiter] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stopping = True
            if batch:
                self._batch_started = time.monotonic()
                try:
                    self._commit(batch)
                except Exception as exc:  # noqa: BLE001 - e.g. MemoryError after the commit: the thread must live on
                    # and every waiter hear something (an answered one ignores this), or DATA waits for ever.
                    log.error("event=commit-thread-error messages=%d error=%r", len(batch), exc)
                    for _, loop, future in batch:
                        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
                            loop.call_soon_threadsafe(_answer, [(future, exc)])
                self._batch_started = None

    def _commit(self, batch: list[Waiter]) -> None:
        # A waiter that is done already gave up (its client heard 451) or went away: not stored.
        # (Read from this thread, done() may lag: such a message is stored, as if it had hung.)
        waiting = [waiter for waiter in batch if not waiter[2].done()]
        if len(waiting) < len(batch):
            log.warning("event=store-dropped messages=%d reason=waiter-gone", len(batch) - len(waiting))
            batch = waiting
            if not batch:
                return
        try:
            outcome: list[int] | BaseException = store(self._engine, [arrival for arrival, _, _ in batch])
        except Exception as exc:  # every waiter must hear about it: each answers 451
            log.error("event=store-failed messages=%d error=%r", len(batch), exc)
            outcome = exc
        else:
            late = [str(id_) for (_, _, future), id_ in zip(batch, outcome) if future.done()]
            if late:  # their clients heard 451 and send them again: processing finds those duplicates
                log.warning("event=stored-after-timeout inbound_ids=%s", ",".join(late))
            try:
                self._on_commit()
            except Exception as exc:  # noqa: BLE001 - the processor's next poll finds the mail: answer the waiters
                log.error("event=processor-wake-failed error=%r", exc)
        # One wake-up per event loop for the whole group, not one per message.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int | BaseException]]] = {}
        for position, (_, loop, future) in enumerate(batch):
            result = outcome if isinstance(outcome, BaseException) else outcome[position]
            by_loop.setdefault(loop, []).append((future, result))
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_answer, answers)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass
        if self._wal_limit is not None and not isinstance(outcome, BaseException):
            self._bound_wal(sum(len(arrival.raw) for arrival, _, _ in batch))

    def _bound_wal(self, committed: int) -> None:
        """Checkpoint (PASSIVE) once the WAL file has grown past the limit.

        The listener's connections never checkpoint on commit (see :func:`intake.store.db.make_engine`):
        the worker does. Should the worker be down or stuck, the WAL would grow without bound. And
        under sustained load even the worker's checkpoints never let the WAL start over, as more
        is committed while they copy. This one runs on the commit thread between two commits, so
        none of the listener's lands while it copies and the next can start the WAL over (cutting
        the file back to the limit, see ``journal_size_limit`` in :mod:`intake.store.db`). The
        file's size is looked at only every quarter of the limit of mail committed, after the
        batch's answers are on their way; the commits queued meanwhile wait for the copy, which
        happens once per limit of mail, and is short when the worker keeps up."""
        self._unmeasured += committed
        if self._unmeasured < self._wal_limit // 4:
            return
        self._unmeasured = 0
        size = wal_size(self._engine)
        if size > self._wal_limit:
            log.info("event=wal-checkpoint wal_bytes=%d limit=%d", size, self._wal_limit)
            try:
                checkpoint(self._engine)
            except Exception as exc:  # noqa: BLE001 - the next look tries again; commits must go on
                log.warning("event=wal-checkpoint-failed error=%r", exc)


def _answer(answers: list[tuple[asyncio.Future[int], int | BaseException]]) -> None:
    for future, result in answers:
        if future.done():  # the SMTP session went away meanwhile
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


def _give_up(future: asyncio.Future[int], timeout: float) -> None:
    if not future.done():
        future.set_exception(StoreTimeout(f"no commit within {timeout:g} s"))
