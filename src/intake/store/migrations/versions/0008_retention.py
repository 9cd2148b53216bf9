"""retention: when a ticket's content was purged, and what each purge_log row counts

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike (batch mode on SQLite; both ADD COLUMNs are plain ALTERs
there, nothing is copied). purge_log rows made before this revision counted held messages only:
their kind is 'held'. No ticket was purged before it: content_purged_at is null.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_purged_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('purge_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='held'))


def downgrade() -> None:
    with op.batch_alter_table('purge_log', schema=None) as batch_op:
        batch_op.drop_column('kind')
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.drop_column('content_purged_at')
