"""A batch row's rejection names its row: ``rejections.row_no``, and an index on the batch.

``GET /v1/batches/{id}`` lists the rows a batch rejected; once ops revalidated them (reference
data fixed), the batch's counters still say what the batch judged, and nothing said which of
those rows the gateway has taken since.  The rejection now keeps the file row it came from, and
``ix_rejections_batch_id_status_row_no`` lets a batch's status count and mark its revalidated
rows from the index alone: partners poll that status while a batch runs, and a late annual
refused whole holds hundreds of thousands of rejections, none revalidated.  Nullable, no
backfill: rejections written before it (and every push's or pull's, which come from no file)
have no row; their batch still counts them.  A rolling release: code before it writes no row
number, which only leaves its rejections unmarked.

The same status pages the batch's row errors by ``id`` (its cursor); SQLite served that from
``ix_batch_errors_batch_row`` (batch_id, row_no) by sorting all of the batch's errors for each
page (68 ms a poll at 300,000).  ``ix_batch_errors_batch_id_id`` (batch_id, id) replaces it:
nothing else reads row errors, and every release pages them the same way.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-26 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rejections') as batch_op:
        batch_op.add_column(sa.Column('row_no', sa.BigInteger(), nullable=True))
        batch_op.create_index('ix_rejections_batch_id_status_row_no', ['batch_id', 'status', 'row_no'],
                              unique=False)
    with op.batch_alter_table('batch_errors') as batch_op:
        batch_op.create_index('ix_batch_errors_batch_id_id', ['batch_id', 'id'], unique=False)
        batch_op.drop_index('ix_batch_errors_batch_row')


def downgrade() -> None:
    with op.batch_alter_table('batch_errors') as batch_op:
        batch_op.create_index('ix_batch_errors_batch_row', ['batch_id', 'row_no'], unique=False)
        batch_op.drop_index('ix_batch_errors_batch_id_id')
    with op.batch_alter_table('rejections') as batch_op:
        batch_op.drop_index('ix_rejections_batch_id_status_row_no')
        batch_op.drop_column('row_no')
