"""inbound_raw: a stored message's bytes in a table of their own

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike. The bytes are moved as they are, sealed or not: a
sealed value's associated data keeps naming ``inbound_message.raw`` (see
intake.store.models.InboundRaw), so nothing is opened or sealed again here and no key is needed.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0019'
down_revision: Union[str, Sequence[str], None] = '0018'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'inbound_raw',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('raw', sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(['id'], ['inbound_message.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.execute('INSERT INTO inbound_raw (id, raw) SELECT id, raw FROM inbound_message')
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.drop_column('raw')


def downgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('raw', sa.LargeBinary(), nullable=False, server_default=sa.text("''")))
    op.execute('UPDATE inbound_message SET raw = '
               '(SELECT raw FROM inbound_raw WHERE inbound_raw.id = inbound_message.id)')
    op.drop_table('inbound_raw')
