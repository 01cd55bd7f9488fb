"""Alerts post outside the claim's transaction: ``alert_state.sent_at``, and a dead-event index.

A claim commits first (``sent_at`` NULL, ``fired_at`` its lease), the webhook is posted with no
transaction open, and ``sent_at`` is set after a 2xx.  Rows already present were committed
only after a successful post, so they are backfilled as sent.  The dead-letter alert's mark is
the sequence number of the last dead-lettering audit event; a partial index keeps reading it
cheap however long the audit trail grows.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

DEAD_EVENTS = "kind = 'dead'"


def upgrade() -> None:
    with op.batch_alter_table('alert_state', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE alert_state SET sent_at = fired_at")
    op.create_index('ix_audit_events_dead', 'audit_events', ['seq'], unique=False,
                    postgresql_where=sa.text(DEAD_EVENTS), sqlite_where=sa.text(DEAD_EVENTS))


def downgrade() -> None:
    op.drop_index('ix_audit_events_dead', table_name='audit_events')
    with op.batch_alter_table('alert_state', schema=None) as batch_op:
        batch_op.drop_column('sent_at')
