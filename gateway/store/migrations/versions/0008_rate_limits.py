"""Per-partner rate limits (issue 6): one GCRA row per app key, shared by every replica.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'rate_limits',
        sa.Column('bucket', sa.String(length=160), nullable=False),
        sa.Column('tat_ms', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('bucket', name=op.f('pk_rate_limits')),
    )


def downgrade() -> None:
    op.drop_table('rate_limits')
