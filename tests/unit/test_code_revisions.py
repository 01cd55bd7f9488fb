"""The migrations' head and revisions as the store check reads them are Alembic's own."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from gateway.store.db import MIGRATIONS_DIR, code_revisions


def test_code_revisions_agree_with_alembics_script_directory() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(cfg)
    head, known = code_revisions()
    assert head == script.get_current_head()
    assert known == {rev.revision for rev in script.walk_revisions()}
    assert len(known) >= 28 and head in known
