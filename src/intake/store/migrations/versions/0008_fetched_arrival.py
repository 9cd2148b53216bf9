"""inbound messages' arrived_at: when a fetched message reached the hosted mailbox (its IMAP
INTERNALDATE, bounded), where its SLA starts

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike: on SQLite, ALTERs run in batch mode (an ADD COLUMN of a
nullable column is a plain ALTER there, so the stored messages are not copied). Messages stored
before this revision keep null: their SLA started where it did.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('arrived_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.drop_column('arrived_at')
