"""the tamper-evident audit chain: one entry per event and per maintainer's read, each MAC'd
over the one before

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike. A new table; nothing existing changes. Events stored
before this revision are not in the chain yet: the first write after it (or the first `intake
audit` command) seals them all, in id order, as of that moment (see intake.store.audit).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0013'
down_revision: Union[str, Sequence[str], None] = '0012'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'audit_entry',
        sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor', sa.Text(), nullable=False),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('ticket_id', sa.Integer(), nullable=True),
        sa.Column('event_id', sa.Integer(), nullable=True),
        sa.Column('detail', sa.JSON(), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('prev_mac', sa.String(length=64), nullable=False),
        sa.Column('mac', sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint('seq'),
        sa.UniqueConstraint('event_id'),
    )
    op.create_index(op.f('ix_audit_entry_ticket_id'), 'audit_entry', ['ticket_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_audit_entry_ticket_id'), table_name='audit_entry')
    op.drop_table('audit_entry')
