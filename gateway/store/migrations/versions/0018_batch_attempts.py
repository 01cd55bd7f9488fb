"""Batches count their claims without progress; their running credits total is unbounded text.

``attempts``: claims since the batch last committed a chunk.  A transient store error or a
killed parse worker puts a batch back for another try; a batch that kills or stops its
processor every time (an OOM on one file) is failed after ``BATCH_MAX_ATTEMPTS`` claims
instead of being taken first after every restart while the batches behind it wait.

``credits_total`` becomes ``Text``: it adds up whatever the credits column holds, and one
absurd cell (forty nines, rejected as a row) overflowed ``VARCHAR(32)`` on PostgreSQL, which
failed the whole batch at that chunk.

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-27 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('batches') as batch_op:
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.alter_column('credits_total', type_=sa.Text(), existing_type=sa.String(32),
                              existing_nullable=False)


def downgrade() -> None:
    # A total longer than the old column (the case this revision is for) keeps its first 32
    # characters: progress text only, and a rollback must not be blocked by it.
    op.execute("UPDATE batches SET credits_total = substr(credits_total, 1, 32) "
               "WHERE length(credits_total) > 32")
    with op.batch_alter_table('batches') as batch_op:
        batch_op.alter_column('credits_total', type_=sa.String(32), existing_type=sa.Text(),
                              existing_nullable=False)
        batch_op.drop_column('attempts')
