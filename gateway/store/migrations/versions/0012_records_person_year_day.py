"""``ix_records_person_year`` gains ``completed_on``: R14 reads a person's records by days.

The integrity check (R14) reads only a person's records of the chunk's CE years whose days meet
the chunk's first-to-last-day window.  With the completion date in the index, SQLite and
PostgreSQL seek to that range instead of walking every entry of the person's year and testing
the dates row by row.  The caps ledger and the compliance read-model, which look up
``(person_key, counts_year)``, use the same index by its prefix.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-26 11:40:00
"""

from __future__ import annotations

from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_records_person_year_day', 'records',
                    ['person_key', 'counts_year', 'completed_on'], unique=False)
    op.drop_index('ix_records_person_year', table_name='records')


def downgrade() -> None:
    op.create_index('ix_records_person_year', 'records', ['person_key', 'counts_year'],
                    unique=False)
    op.drop_index('ix_records_person_year_day', table_name='records')
