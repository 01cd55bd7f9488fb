"""``outbox.queued_at``: when an operator last queued a delivery again.

The backlog's age (metric ``ce_gateway_backlog_oldest_age_seconds`` and the ``backlog_age``
alert) was measured from ``created_at``, so reprocessing a month-old dead letter made the
backlog look a month late and fired a false alert.  It is now measured from
``COALESCE(queued_at, created_at)``; existing rows keep NULL (queued when created).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26 05:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('queued_at')
