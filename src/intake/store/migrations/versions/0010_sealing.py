"""data keys for encryption at rest ([storage] key_file): one per ticket and per ticketless
outgoing mail (table data_key), one per stored message (inbound_message.data_key), wrapped by the
storage key (see intake.store.sealing)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

Content stored before this revision stays plaintext and readable; `intake storage
encrypt-existing` seals it once a key is set.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'data_key',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
        sa.Column('ticket_id', sa.Integer(), nullable=True),
        sa.Column('storage_key', sa.String(length=16), nullable=False),
        sa.Column('wrapped', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ux_data_key_ticket', 'data_key', ['ticket_id'], unique=True,
                    sqlite_where=sa.text('ticket_id IS NOT NULL'), postgresql_where=sa.text('ticket_id IS NOT NULL'))
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.add_column(sa.Column('data_key', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inbound_message', schema=None) as batch_op:
        batch_op.drop_column('data_key')
    op.drop_index('ux_data_key_ticket', table_name='data_key')
    op.drop_table('data_key')
