"""Where a refused record's applied version counts: ``refused_pins``.

A record whose correction the management system refused for good keeps counting its last
applied version there.  When the correction moved it to another person, CE year or activity
type, its ``records`` row no longer says where that is, and the cap group it still counts in
gave its share away (the person counted 30 h of papers against the 20 h cap) while that
person's compliance report left the hours out.  The row written when the refusal lands says
where the applied version counts, and how many hours.

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-27 12:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'refused_pins',
        sa.Column('record_id', sa.String(32), primary_key=True),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('person_key', sa.String(64), nullable=False),
        sa.Column('year', sa.Integer(), nullable=False),
        sa.Column('cap_type', sa.String(16), nullable=True),
        sa.Column('hours', sa.String(16), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_refused_pins_person_year', 'refused_pins', ['person_key', 'year'])


def downgrade() -> None:
    op.drop_index('ix_refused_pins_person_year', table_name='refused_pins')
    op.drop_table('refused_pins')
