"""Records keep whether a national competition award covers the tenure's professional hours.

R7 (四(二)5): a national vocational skills competition award of 优胜奖 or above counts as all
the professional hours of the tenure (任职期间全部专业课学时).  The rules knew it of each record
but nothing kept it, so the compliance read-model counted the award in its own year only.
``records.covers_professional`` keeps the judgement with the record's other rules columns (it
outlives the payload, which retention prunes).  Nullable, no backfill: code before it runs
beside it and leaves it null, and the read-model reads a null competition record's payload
for the rule note that says so (``COVERS_PROFESSIONAL_REQUIREMENT``).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('records') as batch_op:
        batch_op.add_column(sa.Column('covers_professional', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('records') as batch_op:
        batch_op.drop_column('covers_professional')
