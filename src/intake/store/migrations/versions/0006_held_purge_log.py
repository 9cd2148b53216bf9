"""the purge log of held messages, and an index finding the held messages of a window

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike. purge_log records each purge of held messages (when,
the cutoff, how many per decision) so the count survives the rows; the index on
inbound_message (status, processed_at) lets the digest, the metrics and the purge read the held
messages of a window without scanning all stored mail. Nothing existing changes.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'purge_log',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('purged_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('cutoff', sa.DateTime(timezone=True), nullable=False),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('by_decision', sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_inbound_status_processed_at', 'inbound_message', ['status', 'processed_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_inbound_status_processed_at', table_name='inbound_message')
    op.drop_table('purge_log')
