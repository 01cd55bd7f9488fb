"""Data repairs a migration queues for the code at its head: ``store_repairs``.

A migration runs the code of its own day, so it cannot redo what today's rules would do with
the rows (its SQL would have to copy them, and would go stale with them).  Such a repair is
queued here instead, one row a repair, in the migration's transaction; ``gateway.store.db
.upgrade`` runs it with this code once the store is at the head, and deletes the row in the
repair's own transaction (``gateway/repairs.py``).  Until then the store is not ready:
``/readyz`` and every command name ``ce-gateway db upgrade`` (``db.revision_behind``).

Queued here: ``refused_pins``.  Migration 0019 created ``refused_pins`` empty, and a record
whose correction the management system refused for good before it (its delivered version still
counts there) kept no pin: its cap group gave that version's share away, so a person could be
credited 30 h of papers against the 20 h cap (R10, 四(二)1).  Queued only on a store holding such
a refusal.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-04 10:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None

# gateway.pipeline.caps.REFUSED_FOR_GOOD, copied: a migration does not follow later code.
REFUSED_FOR_GOOD = ('DOWNSTREAM_REJECTED',)


def upgrade() -> None:
    repairs = op.create_table(
        'store_repairs',
        sa.Column('name', sa.String(64), primary_key=True),
        sa.Column('queued_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('reason', sa.String(500), nullable=False),
    )
    outbox = sa.table('outbox', sa.column('status'), sa.column('error_code'))
    refused = op.get_bind().execute(sa.select(sa.literal(1)).select_from(outbox).where(
        outbox.c.status == 'dead', outbox.c.error_code.in_(REFUSED_FOR_GOOD)).limit(1)).first()
    if refused is not None:
        op.bulk_insert(repairs, [{
            'name': 'refused_pins', 'queued_at': datetime.now(UTC),
            'reason': 'records refused for good before migration 0019 keep no refused_pins row'}])


def downgrade() -> None:
    op.drop_table('store_repairs')
