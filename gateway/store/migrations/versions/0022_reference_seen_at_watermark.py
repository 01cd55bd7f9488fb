"""Reference watermarks remember the items the last sync took at the watermark.

``since`` is inclusive, so a sync fetches again the items stamped exactly at its stored
watermark (items sharing a timestamp must not be lost).  Upserting them again reverted an ops
CSV import of such an item on every sync, with nothing new upstream.  ``pull_state.seen`` holds
digests of the items stamped at ``cursor`` that the last sync took (reference kinds only; JSON
``{"since": cursor, "items": [...]}``): such an item served again unchanged is skipped, a new
one at that timestamp is taken.  Nullable: code before it runs beside it (it moves ``cursor``
and leaves ``seen`` naming the old one, which is then ignored).

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pull_state') as batch_op:
        batch_op.add_column(sa.Column('seen', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('pull_state') as batch_op:
        batch_op.drop_column('seen')
