"""tickets opened from imported history (intake import): when they were imported, so that the SLA
sweep mails nothing that fell due before then

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

Write it for SQLite and PostgreSQL alike: on SQLite, ALTERs run in batch mode (a nullable ADD COLUMN
is a plain ALTER there, so the tickets are not copied).
Tickets opened before this revision keep null: the sweep treats them as live tickets, as before
(an import made before this revision sent its tickets' old breach notices already, if any).
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.add_column(sa.Column('imported_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('ticket', schema=None) as batch_op:
        batch_op.drop_column('imported_at')
