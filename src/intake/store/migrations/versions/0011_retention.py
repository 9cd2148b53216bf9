"""retention: when a ticket's content was purged, and what each purge_log row counts

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike (batch mode on SQLite: the ADD COLUMNs are plain ALTERs,
making purge_log.kind NOT NULL copies that small table). purge_log rows made before this revision
counted held messages only: their kind is 'held-messages' (PurgeKind.HELD). No ticket was purged
before it: content_purged_at is null.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0011'
down_revision: Union[str, Sequence[str], None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_purged_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('purge_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=True))
    op.execute("UPDATE purge_log SET kind = 'held-messages'")
    with op.batch_alter_table('purge_log', schema=None) as batch_op:  # SQLite: a copy of a small table
        batch_op.alter_column('kind', existing_type=sa.String(length=16), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('purge_log', schema=None) as batch_op:
        batch_op.drop_column('kind')
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.drop_column('content_purged_at')
