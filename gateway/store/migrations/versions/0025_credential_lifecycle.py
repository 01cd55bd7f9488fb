"""Credential lifecycle: ``operators.revoked_at`` and ``partners.disabled_at``.

``ce-gateway operator revoke`` ends an operator's token and ``partner disable`` a partner's
access; the listings (``operator list``, ``partner list``) show since when.  What refuses them
is not these columns: a revoked operator's token hash is replaced (the token, and every console
session bound to its hash, stop working on code before this migration too), and a disabled
partner is ``active`` false, as the authentication has always read it.  Both nullable, no
backfill: a rolling release (code before it runs beside it and leaves them null).

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-05 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('operators') as batch_op:
        batch_op.add_column(sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('partners') as batch_op:
        batch_op.add_column(sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('partners') as batch_op:
        batch_op.drop_column('disabled_at')
    with op.batch_alter_table('operators') as batch_op:
        batch_op.drop_column('revoked_at')
