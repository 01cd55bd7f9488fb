"""A partial index on ``records.duplicate_of``: the reports held as repeats of a record.

When a record stops holding its activity (withdrawn, corrected away, superseded), the
reports of that activity held as its duplicates are read by this column, so the earliest can
take over (``gateway.pipeline.ingest.succeed``).  Partial: most records repeat nothing.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-27 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None

HELD = "duplicate_of IS NOT NULL"


def upgrade() -> None:
    op.create_index('ix_records_duplicate_of', 'records', ['duplicate_of'], unique=False,
                    postgresql_where=sa.text(HELD), sqlite_where=sa.text(HELD))


def downgrade() -> None:
    op.drop_index('ix_records_duplicate_of', table_name='records')
