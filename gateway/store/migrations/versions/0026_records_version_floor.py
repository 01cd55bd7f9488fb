"""Version floor after a restore: ``records.version_floor``.

``ce-gateway db restored`` (run after restoring the store from a backup) sets it to each
record's current version plus a gap, so the next version the gateway makes of a record is
numbered past whatever the management system received between the backup and the disaster;
the management system matches a record on (record id, version) and would answer ``duplicate``
for a reused number whatever its content (docs/operations.md "Backup and restore").  Nullable,
no backfill: null means the store was never restored, and code before this migration, which
does not read it, numbers as it always did (a restore stops the cluster anyway).

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-12 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('records') as batch_op:
        batch_op.add_column(sa.Column('version_floor', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('records') as batch_op:
        batch_op.drop_column('version_floor')
