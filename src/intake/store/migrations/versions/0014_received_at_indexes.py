"""indexes on ticket.received_at and inbound_message.received_at, for the stats of a window

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike. `intake stats` and the digest's footer count the tickets
and messages received since a date in the database (GROUP BY), instead of reading them: these
indexes find a window's rows without reading the whole table. Nothing else changes.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0014'
down_revision: Union[str, Sequence[str], None] = '0013'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index(op.f('ix_ticket_received_at'), 'ticket', ['received_at'], unique=False)
    op.create_index(op.f('ix_inbound_message_received_at'), 'inbound_message', ['received_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_inbound_message_received_at'), table_name='inbound_message')
    op.drop_index(op.f('ix_ticket_received_at'), table_name='ticket')
