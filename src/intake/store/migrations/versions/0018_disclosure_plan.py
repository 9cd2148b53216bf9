"""coordinated disclosure: a ticket's proposed and agreed disclosure date

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike. A new table; nothing existing changes.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0018'
down_revision: Union[str, Sequence[str], None] = '0017'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'disclosure_plan',
        sa.Column('ticket_id', sa.Integer(), nullable=False),
        sa.Column('proposed_date', sa.Date(), nullable=True),
        sa.Column('proposed_by', sa.Text(), nullable=True),
        sa.Column('proposed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('agreed_date', sa.Date(), nullable=True),
        sa.Column('agreed_by', sa.Text(), nullable=True),
        sa.Column('agreed_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['ticket_id'], ['ticket.id']),
        sa.PrimaryKeyConstraint('ticket_id'),
    )
    op.create_index(op.f('ix_disclosure_plan_agreed_date'), 'disclosure_plan', ['agreed_date'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_disclosure_plan_agreed_date'), table_name='disclosure_plan')
    op.drop_table('disclosure_plan')
