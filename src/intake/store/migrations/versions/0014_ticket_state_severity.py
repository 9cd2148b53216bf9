"""an index on ticket (state, severity), for the digest's and the stats' counts

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike. The digest's table of open tickets by state and severity
and `intake stats` count with GROUP BY state, severity: with this index they read the index alone
instead of every ticket row. Nothing else changes.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0014'
down_revision: Union[str, Sequence[str], None] = '0013'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index('ix_ticket_state_severity', 'ticket', ['state', 'severity'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_ticket_state_severity', table_name='ticket')
