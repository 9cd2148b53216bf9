"""OpenPGP: reporters' public keys (reporter_key), and what OpenPGP made of each inbound entry
(thread_entry.pgp: decrypted, signed, signer, verified)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03

Entries stored before this revision were never decrypted: pgp stays null for them.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0012'
down_revision: Union[str, Sequence[str], None] = '0011'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('reporter_key',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('address', sa.Text(), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('armored', sa.Text(), nullable=False),
    sa.Column('ticket_id', sa.Integer(), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['ticket_id'], ['ticket.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('address', 'fingerprint')
    )
    with op.batch_alter_table('reporter_key', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reporter_key_address'), ['address'], unique=False)
    with op.batch_alter_table('thread_entry', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pgp', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('thread_entry', schema=None) as batch_op:
        batch_op.drop_column('pgp')
    with op.batch_alter_table('reporter_key', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reporter_key_address'))
    op.drop_table('reporter_key')
