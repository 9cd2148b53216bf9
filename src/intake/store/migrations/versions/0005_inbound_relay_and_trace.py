"""the trusted relay each inbound message came through, and intake's own trace fields

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike: on SQLite, ALTERs run in batch mode (an ADD COLUMN with a
default is a plain ALTER there, so the stored messages are not copied).
Messages stored before this revision came through no relay intake knew of, and were stored
without trace fields: both '' (nothing is made up for them).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('relay', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('trace', sa.Text(), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.drop_column('trace')
        batch_op.drop_column('relay')
