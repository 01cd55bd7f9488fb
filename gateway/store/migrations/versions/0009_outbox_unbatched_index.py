"""A partial index on the outbox rows waiting for a delivery batch (issue 6, scale-out).

Forming a batch reads ``status = 'pending' AND batch_key IS NULL`` rows in id order; with
only the (status, batch_key) index the cost grew with the delivered rows behind them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26 02:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

UNBATCHED = "status = 'pending' AND batch_key IS NULL"


def upgrade() -> None:
    op.create_index('ix_outbox_unbatched', 'outbox', ['id'], unique=False,
                    postgresql_where=sa.text(UNBATCHED), sqlite_where=sa.text(UNBATCHED))


def downgrade() -> None:
    op.drop_index('ix_outbox_unbatched', table_name='outbox')
