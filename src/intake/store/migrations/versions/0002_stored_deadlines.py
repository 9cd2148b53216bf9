"""stored deadlines: each ticket's stages and when they are due

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Tickets from before this revision have no rows here: `intake serve` and `intake db upgrade` fill
them in from the configured policies after upgrading (intake.sla.deadlines.backfill), since a
migration cannot read the policies.

Write it for SQLite and PostgreSQL alike: on SQLite, ALTERs run in batch mode (copy and move).
Types are plain SQLAlchemy (intake's own types are rendered as what they store), so this file
keeps working whatever happens to intake's modules.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('deadline',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ticket_id', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('met_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('basis', sa.Text(), nullable=False),
    sa.Column('severity_assumed', sa.Boolean(), nullable=False),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['ticket_id'], ['ticket.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ticket_id', 'stage')
    )
    with op.batch_alter_table('deadline', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deadline_ticket_id'), ['ticket_id'], unique=False)
        batch_op.create_index('ix_deadline_unmet_due', ['due_at'], unique=False,
                              sqlite_where=sa.text('met_at IS NULL'), postgresql_where=sa.text('met_at IS NULL'))


def downgrade() -> None:
    with op.batch_alter_table('deadline', schema=None) as batch_op:
        batch_op.drop_index('ix_deadline_unmet_due', sqlite_where=sa.text('met_at IS NULL'),
                            postgresql_where=sa.text('met_at IS NULL'))
        batch_op.drop_index(batch_op.f('ix_deadline_ticket_id'))

    op.drop_table('deadline')
