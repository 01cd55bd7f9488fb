"""``batch_repeats``: every batch that carried a record again unchanged (reconciliation).

The reconciliation report read ``records.last_batch_id``, one pointer to the last batch that
carried a record, so a later batch that repeated the record (the annual file sent again, a
month sent again after the annual) moved the pointer and rewrote the report: the annual's
repeats became "lacking".  Each repeat is now a row of its own.

Backfill: what the pointer still tells — a record whose last batch is neither its first nor
the batch of one of its versions was last carried unchanged by that batch.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-26 15:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'batch_repeats',
        sa.Column('batch_id', sa.String(length=40), nullable=False),
        sa.Column('record_id', sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint('batch_id', 'record_id'),
    )
    op.execute(
        "INSERT INTO batch_repeats (batch_id, record_id) "
        "SELECT r.last_batch_id, r.record_id FROM records r "
        "WHERE r.last_batch_id IS NOT NULL "
        "AND (r.batch_id IS NULL OR r.batch_id <> r.last_batch_id) "
        "AND NOT EXISTS (SELECT 1 FROM record_versions v WHERE v.record_id = r.record_id "
        "AND v.batch_id = r.last_batch_id)")


def downgrade() -> None:
    op.drop_table('batch_repeats')
