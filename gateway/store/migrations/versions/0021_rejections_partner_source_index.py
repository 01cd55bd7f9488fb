"""An index on a rejection's partner and source id: the partner's later word on a record.

Revalidation replays only a partner's latest word on a source id: an older rejection the
partner has since corrected, withdrawn or sent again is closed (``gateway/revalidate.py``).
Each chunk of rejections reads the other rejections of its source ids, partner by partner;
the partner index alone read every rejection of a partner with many (a health batch's).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0021'
down_revision = '0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_rejections_partner_id_source_record_id', 'rejections',
                    ['partner_id', 'source_record_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_rejections_partner_id_source_record_id', table_name='rejections')
