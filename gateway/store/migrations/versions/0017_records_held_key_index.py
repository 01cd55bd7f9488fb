"""A partial index on the natural key of held records (duplicates and conflicts).

When a record lets its activity go (withdrawn, corrected away, superseded), the reports of
that activity held as duplicates or conflicts are read by natural key, so the earliest can
take over (``gateway.pipeline.succession.succeed``).  Partial: most records are accepted.

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

HELD = "status IN ('duplicate', 'conflict')"


def upgrade() -> None:
    op.create_index('ix_records_held_key', 'records', ['natural_key'], unique=False,
                    postgresql_where=sa.text(HELD), sqlite_where=sa.text(HELD))


def downgrade() -> None:
    op.drop_index('ix_records_held_key', table_name='records')
