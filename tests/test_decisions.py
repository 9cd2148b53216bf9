"""The decision table: every routing decision has one entry, and each says what acting on it does.

What the entries make happen is checked end to end by test_processing, test_routing,
test_maintainer_mail, test_identities and test_nodes; here, that the table itself is complete and
says what intake has always done for each decision.
"""

from __future__ import annotations

import pytest

from intake.understand.decisions import HANDLING, Mail, OnTicket, Record, handling
from intake.understand.route import Decision
from intake.vocabulary import (
    AUTO_REPLY, BOUNCE, DECISIONS, DUPLICATE, LOOP, MAINTAINER_REPLY, NEW_TICKET, REJECTED, REPORTER_REPLY, SPAM,
    THIRD_PARTY_REPLY, InboundStatus,
)

# The messages that add to a ticket; every other decision leaves its message ignored.
_ADD_TO_A_TICKET = {NEW_TICKET, REPORTER_REPLY, MAINTAINER_REPLY, THIRD_PARTY_REPLY}
# Decisions recorded in the thread of the ticket they thread into (when they thread into one).
_THREADED = {REPORTER_REPLY, MAINTAINER_REPLY, THIRD_PARTY_REPLY, AUTO_REPLY, BOUNCE}


def test_every_decision_has_one_entry():
    assert set(HANDLING) == set(DECISIONS)
    assert len(DECISIONS) == len(set(DECISIONS))


@pytest.mark.parametrize("kind", DECISIONS)
def test_status_is_processed_only_for_messages_that_add_to_a_ticket(kind):
    expected = InboundStatus.PROCESSED if kind in _ADD_TO_A_TICKET else InboundStatus.IGNORED
    assert HANDLING[kind].status == expected


@pytest.mark.parametrize("kind", DECISIONS)
@pytest.mark.parametrize("ticket_id", [None, 7])
def test_what_is_recorded(kind, ticket_id):
    decision = Decision(kind, "because", ticket_id=ticket_id)
    entry = handling(decision)
    # A duplicate names the ticket its first copy went to, and adds nothing to it.
    assert entry.records_on_ticket(decision) == (kind in _THREADED and ticket_id is not None)
    assert entry.writes_message(decision) == (kind == NEW_TICKET or entry.records_on_ticket(decision))
    assert (entry.record is Record.NEW_TICKET) == (kind == NEW_TICKET)
    assert (entry.record is Record.NOTHING) == (kind in {DUPLICATE, LOOP, SPAM, REJECTED})


def test_what_changes_on_the_ticket():
    changes = {kind: entry.on_ticket for kind, entry in HANDLING.items() if entry.on_ticket is not OnTicket.NOTHING}
    # Only the reporter's own reply resumes a waiting ticket or sets credit; a third party's changes nothing.
    assert changes == {REPORTER_REPLY: OnTicket.REPORTER_BACK, BOUNCE: OnTicket.BOUNCE}


def test_what_mail_each_decision_sends():
    assert {kind: entry.mail for kind, entry in HANDLING.items()} == {
        NEW_TICKET: Mail.ACKNOWLEDGE,
        REPORTER_REPLY: Mail.FORWARD,
        THIRD_PARTY_REPLY: Mail.FORWARD,
        MAINTAINER_REPLY: Mail.MAINTAINER_MAIL,
        REJECTED: Mail.REFUSAL,  # to the maintainer whose reply address was refused, never the sender
        AUTO_REPLY: Mail.NONE,
        BOUNCE: Mail.NONE,
        DUPLICATE: Mail.NONE,
        LOOP: Mail.NONE,
        SPAM: Mail.NONE,
    }


def test_mail_that_acts_on_a_ticket_comes_only_from_decisions_recorded_on_one():
    # The processor hands a message to maintainer_mail.act_on only once it is recorded on its ticket.
    for kind, entry in HANDLING.items():
        if entry.mail in (Mail.FORWARD, Mail.MAINTAINER_MAIL):
            assert entry.record is Record.THREAD, kind
