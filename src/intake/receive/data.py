"""DATA as intake's listener reads it: into a spool, held against the listener's memory budget.

A mixin of :class:`intake.receive.listener.IntakeSMTP` (before aiosmtpd's ``SMTP``): its
``smtp_DATA`` is aiosmtpd's (1.4.x), command checks, replies and hook call alike, but the message
is read by :func:`intake.receive.spool.receive`, so the listener holds one copy of it (not a list
of lines and their join), and every transaction's bytes count against ``smtp.memory_budget``:
DATA with a declared SIZE= that does not fit, or whose bytes go past what is left, gets
``452 4.3.1`` (the client keeps the message and retries), never an out-of-memory kill that could
take accepted mail with it. (aiosmtpd's ``decode_data`` and its ``process_message`` hook are not
kept: intake's listener takes bytes, through ``handle_DATA``.)
"""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import SMTP

from intake.receive import spool
from intake.run import metrics

log = logging.getLogger(__name__)


class SpooledData(SMTP):
    """``smtp_DATA`` through a spool and the memory budget (see the module)."""

    _admitted: str | None = None  # IntakeSMTP's: the client's address, for the log

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's DATA (1.4.x), but the message is read into a spool (see intake.receive.spool)
        # and held against the listener's memory budget: 452 when it has no room.
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        handler = self.event_handler  # an IntakeHandler: its memory budget and spool folder
        reservation = handler.memory.reservation()
        try:
            if not reservation.cover(_declared_size(self.envelope.mail_options)):
                await self._refuse_for_memory(reservation, spool.Outcome.OVER_BUDGET)
                return
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            with spool.Spool(handler.spool_dir) as data:
                try:
                    outcome = await spool.receive(self._reader, data, self.data_size_limit, self.line_length_limit,
                                                  reservation.cover)
                except asyncio.CancelledError:  # the connection was lost during DATA (as aiosmtpd)
                    log.info("event=connection-lost-in-data peer=%s", self._admitted)
                    self._writer.close()
                    raise
                if outcome is not spool.Outcome.COMPLETE:
                    await self._refuse_data(outcome, reservation)
                    return
                try:
                    content = data.content()
                except MemoryError:  # the budget is above what the process may have: 452, not aiosmtpd's 500
                    await self._refuse_for_memory(reservation, spool.Outcome.OUT_OF_MEMORY)
                    return
            self.envelope.content = self.envelope.original_content = content
            del content  # the envelope's is the one copy
            status = await self._call_handler_hook("DATA")
        finally:
            reservation.release()
        self._set_post_data_state()
        await self.push(status)

    async def _refuse_data(self, outcome: spool.Outcome, reservation: spool.Reservation) -> None:
        if outcome is spool.Outcome.OVER_BUDGET or outcome is spool.Outcome.OUT_OF_MEMORY:
            await self._refuse_for_memory(reservation, outcome)
            return
        self._set_post_data_state()
        if outcome is spool.Outcome.SPOOL_FAILED:
            metrics.received("store-failed")
            await self.push("451 4.3.0 Requested action aborted: local error in processing, try again later")
        elif outcome is spool.Outcome.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        else:
            await self.push("552 Error: Too much mail data")

    async def _refuse_for_memory(self, reservation: spool.Reservation, outcome: spool.Outcome) -> None:
        # reason=memory-budget: the budget had no room; out-of-memory: it had, the process had not
        # (a MemoryError: an address-space limit, or a budget above what the machine can give).
        reason = "memory-budget" if outcome is spool.Outcome.OVER_BUDGET else outcome.value
        budget = self.event_handler.memory
        log.warning("event=data-refused peer=%s reason=%s held=%d budget=%d", self._admitted, reason,
                    budget.used - reservation.held, budget.limit)
        metrics.received(reason)
        self._set_post_data_state()
        await self.push("452 4.3.1 Insufficient system storage, try again later")


def _declared_size(mail_options: list[str]) -> int:
    """The SIZE= a client declared at MAIL (RFC 1870; aiosmtpd checked it is digits), else 0."""
    for option in mail_options:
        if option.startswith("SIZE="):
            return int(option[5:])
    return 0
