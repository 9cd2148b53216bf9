"""the sender-authentication verdict of each inbound message

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike: on SQLite, ALTERs run in batch mode (copy and move).
Messages processed before this revision keep no verdict (NULL): it was never computed for them.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('authentication', sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.drop_column('authentication')
