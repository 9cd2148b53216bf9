"""inbound messages imported as history (intake import): processed without sending anything, and
the Message-ID they were imported under (so importing again finds them, held ones too)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike: on SQLite, ALTERs run in batch mode (an ADD COLUMN with a
default is a plain ALTER there, so the stored messages are not copied).
Messages stored before this revision came through SMTP: none of them is history (false), and the
listener never reads a Message-ID (null).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('history', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('message_id', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_inbound_message_message_id'), ['message_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inbound_message_message_id'))
        batch_op.drop_column('message_id')
        batch_op.drop_column('history')
