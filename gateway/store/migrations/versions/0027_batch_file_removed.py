"""Batch file retention: ``batches.file_removed_at``.

A batch file in ``BATCH_DIR`` is the partner's upload as it came: every row's identity number
and name.  Once the batch is finished (``done`` or ``failed``) nothing reads it again, so the
retention job deletes it ``RETENTION_PAYLOAD_DAYS`` after the batch finished and records when
here (docs/retention-and-audit.md).  Nullable, no backfill: null means the file was never
removed, and code before this migration neither reads nor removes files, so a rolling release
only keeps files a little longer.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-19 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch_op:
        batch_op.add_column(sa.Column('file_removed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch_op:
        batch_op.drop_column('file_removed_at')
