"""A failed batch keeps its coded reason: ``batches.error_code`` and ``batches.error_zh``.

``GET /v1/batches/{id}`` said why a batch failed in English only, with no code (SPEC §6: every
error has a stable code and a Chinese and an English message).  Batches that failed before
keep ``error`` alone and are reported as ``BATCH_FAILED``.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-26 16:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch_op:
        batch_op.add_column(sa.Column('error_code', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('error_zh', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch_op:
        batch_op.drop_column('error_zh')
        batch_op.drop_column('error_code')
