"""Claims on pending messages: each processor (the worker of every node, or ``intake process``
beside them) takes distinct messages to act on, so processing grows with the nodes.

A processor claims a batch in one short write transaction (:func:`claim`): the oldest pending
messages nobody holds a live claim on, in id order, up to ``processing.batch_size`` messages and
``processing.batch_bytes`` bytes, but always at least one (a message larger than the budget is a
batch alone: a worker holds one large message at a time). On PostgreSQL the candidate rows are
read ``FOR UPDATE SKIP LOCKED``: nodes claiming at the same moment take different rows without
waiting for each other. On SQLite the writer lock serialises claims.

A claim holds for ``processing.claim_lease`` seconds and is renewed while its batch is worked on
(:class:`Lease`). A processor that dies (kill -9, a lost machine) renews nothing: its claims run
out and the next processor to look takes those messages (*reclaimed*, counted and logged). A
worker that starts ends at once the claims of processes of its own host that are gone
(:func:`release_dead`): one node restarted after a crash does not wait out its lease. The act
re-checks, under the row lock, that each message is still pending and still claimed by this
batch (:func:`still_mine`): a processor whose lease ran out while it parsed, and whose messages
another took meanwhile, acts on none of them, so no message is acted on twice.

Why two columns on ``inbound_message`` rather than a table of claims: a claim is one pair of
values per pending message, read with its status in the same index scan and locked with the
same row; a table would add a join to every claim and act check, and rows of its own to clean up.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Integer, bindparam, or_, select, update
from sqlmodel import Session

from intake.store.db import write_connection, write_session
from intake.store.inbound import byte_groups
from intake.store.models import InboundMessage
from intake.vocabulary import InboundStatus

log = logging.getLogger(__name__)

_TABLE = InboundMessage.__table__
_IDS = bindparam("ids", expanding=True)
# Built once (a claim and the act's check run for every batch: building a statement cost more
# than running it); the values are bound at each run.
_CANDIDATES = (select(_TABLE.c.id, _TABLE.c.size, _TABLE.c.claimed_by, _TABLE.c.claimed_until)
               .where(_TABLE.c.status == InboundStatus.PENDING,
                      or_(_TABLE.c.claimed_until.is_(None), _TABLE.c.claimed_until < bindparam("now")))
               .order_by(_TABLE.c.id)
               .limit(bindparam("most", type_=Integer)))
# Rows another node is claiming or acting on right now are left to it, not waited for (PostgreSQL).
_CANDIDATES_UNLOCKED = _CANDIDATES.with_for_update(skip_locked=True)
_TAKE = update(_TABLE).where(_TABLE.c.id.in_(_IDS)).values(claimed_by=bindparam("owner"),
                                                           claimed_until=bindparam("until"))
_RENEW = (update(_TABLE).where(_TABLE.c.id.in_(_IDS), _TABLE.c.claimed_by == bindparam("owner"),
                               _TABLE.c.status == InboundStatus.PENDING)
          .values(claimed_until=bindparam("until")))
_STILL_MINE = select(_TABLE.c.id).where(_TABLE.c.id.in_(_IDS), _TABLE.c.status == InboundStatus.PENDING,
                                        _TABLE.c.claimed_by == bindparam("owner"))
# A row locked by another transaction is another node claiming it after our claim ran out: left
# to it. SQLite's writer lock already serialises this.
_STILL_MINE_UNLOCKED = _STILL_MINE.with_for_update(skip_locked=True)


@dataclass(frozen=True)
class Claim:
    """The messages one batch took, in id order."""

    owner: str  # who holds them: see new_owner
    ids: list[int]
    size: int  # their bytes together
    reclaimed: int = 0  # of them, taken over from a processor whose claim had run out
    full: bool = False  # cut short by the count or the byte budget: more may be waiting


def new_owner() -> str:
    """The name a batch claims under: this host and process (what an operator reads, in
    ``intake messages`` and the logs) and a token of the batch, so that two batches of one
    process (a retry, a test's thread) never take each other's claims for their own."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"


def claim(engine: Engine, owner: str, now: datetime, lease: timedelta, most: int, byte_budget: int) -> Claim:
    """Claim for *owner*, until *now* + *lease*, the oldest pending messages nobody holds a live
    claim on: at most *most*, and no more than *byte_budget* bytes unless the first alone is."""
    # Not fsync'd: a claim lost to a power cut only lets its messages be claimed again. Core, not
    # an ORM session: this transaction runs once per batch, however small the batch.
    with write_connection(engine, durable=False) as connection:
        candidates = _CANDIDATES_UNLOCKED if connection.dialect.name == "postgresql" else _CANDIDATES
        rows = connection.execute(candidates, {"now": now, "most": most}).all()
        taken = next(byte_groups(rows, byte_budget), [])
        if not taken:
            return Claim(owner, [], 0)
        connection.execute(_TAKE, {"ids": [row.id for row in taken], "owner": owner, "until": now + lease})
    expired = [row for row in taken if row.claimed_until is not None]
    if expired:
        log.warning("event=claims-reclaimed messages=%d inbound_ids=%s from=%s", len(expired),
                    [row.id for row in expired], sorted({row.claimed_by for row in expired}))
    return Claim(owner, [row.id for row in taken], sum(row.size for row in taken), len(expired),
                 full=len(rows) == most or len(taken) < len(rows))


def release_dead(engine: Engine, now: datetime) -> int:
    """End the live claims of processes of this host that are gone (a worker restarted after a
    crash, a service killed and started again); how many messages were released.

    A claim names its host and process (:func:`new_owner`); on another host we cannot tell a
    live process from a dead one, and those claims run out by their lease. Should two machines
    share a host name, a live claim of the other may be released here: its messages may then be
    parsed twice, but are acted on once (the act checks who holds the claim)."""
    host = f"{socket.gethostname()}/"
    with write_session(engine, durable=False) as session:
        owners = session.scalars(select(_TABLE.c.claimed_by).distinct()
                                 .where(_TABLE.c.status == InboundStatus.PENDING, _TABLE.c.claimed_until >= now))
        dead = [owner for owner in owners if owner.startswith(host) and not _alive(owner[len(host):].split("/")[0])]
        if not dead:
            return 0
        released = session.execute(update(_TABLE).where(_TABLE.c.claimed_by.in_(dead),
                                                        _TABLE.c.status == InboundStatus.PENDING)
                                   .values(claimed_until=None)).rowcount
    log.warning("event=claims-released messages=%d from=%s reason=process-gone", released, sorted(dead))
    return released


def _alive(pid: str) -> bool:
    """Whether process *pid* of this host exists (anything unreadable counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def renew(engine: Engine, owner: str, ids: list[int], until: datetime) -> int:
    """Extend *owner*'s claims on those of *ids* it has not acted on yet up to *until*; how many.
    A message another processor took meanwhile (its claim had run out) stays with it."""
    with write_connection(engine, durable=False) as connection:
        return connection.execute(_RENEW, {"ids": ids, "owner": owner, "until": until}).rowcount


def still_mine(session: Session, owner: str, ids: list[int]) -> set[int]:
    """Which of *ids* are still pending and claimed by *owner*, locked until the end of
    *session*'s transaction: those, and only those, *owner* may act on in it."""
    connection = session.connection()  # the session's transaction, without the ORM's cost per statement
    query = _STILL_MINE_UNLOCKED if connection.dialect.name == "postgresql" else _STILL_MINE
    return set(connection.execute(query, {"ids": ids, "owner": owner}).scalars())


class Lease:
    """A batch's claim kept alive while the batch is worked on: renewed, before a message is
    prepared, once a third of the lease has passed since the last renewal. ``claim_lease`` is at
    least twice ``parse_timeout`` (the most one message's parse may take), so the claim never
    runs out under a processor that is alive."""

    def __init__(self, engine: Engine, claimed: Claim, now: datetime, lease: timedelta,
                 clock: Callable[[], float] = time.monotonic):
        self._engine, self._claim, self._now, self._lease, self._clock = engine, claimed, now, lease, clock
        self._started = self._renewed = clock()
        self.renewals = 0

    def kept(self, items: Iterable[Any]) -> Iterator[Any]:
        """*items*, the claim renewed as needed before each is handed on."""
        for item in items:
            self.renew_if_due()
            yield item
            del item  # not kept while the next is made (a large message, read from the database)

    def renew_if_due(self) -> None:
        if self._clock() - self._renewed < self._lease.total_seconds() / 3:
            return
        self._renewed = self._clock()
        # The batch's now moved on by the time it has been worked on.
        until = self._now + timedelta(seconds=self._renewed - self._started) + self._lease
        renewed = renew(self._engine, self._claim.owner, self._claim.ids, until)
        self.renewals += 1
        log.info("event=claim-renewed claim=%s messages=%d until=%s", self._claim.owner, renewed, until.isoformat())
