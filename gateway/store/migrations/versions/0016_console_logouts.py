"""``console_logouts``: a console session ended by logging out stays ended.

The session cookie is signed, not stored: logging out deleted it from the browser, but a copy
of it (a shared machine, a proxy log) still opened the console for up to 8 hours.  The
session ids of logged-out sessions are kept until their own expiry.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-26 16:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'console_logouts',
        sa.Column('sid', sa.String(length=64), nullable=False),
        sa.Column('expires_at', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('sid'),
    )


def downgrade() -> None:
    op.drop_table('console_logouts')
