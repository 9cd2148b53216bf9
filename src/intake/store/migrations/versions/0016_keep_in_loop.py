"""an index on ticket (policy, state): the sweep's keep-in-loop scan reads only the tickets of
policies with a keep_in_loop period in the states worked on

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike. A new index; nothing existing changes.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0016'
down_revision: Union[str, Sequence[str], None] = '0015'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_ticket_policy_state', 'ticket', ['policy', 'state'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_ticket_policy_state', table_name='ticket')
