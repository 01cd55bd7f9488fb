"""The migrations' head and revisions as the store check reads them are Alembic's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

import gateway.store.db as db

HEADER = '"""{doc}\n\nRevision ID: {rev}\nRevises: {down}\n"""\n\nfrom alembic import op\n\n'
BODY = "\n\ndef upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n"


def _alembic(location: Path) -> tuple[str | None, set[str]]:
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    script = ScriptDirectory.from_config(cfg)
    return script.get_current_head(), {rev.revision for rev in script.walk_revisions()}


def test_code_revisions_agree_with_alembics_script_directory() -> None:
    head, known = db.code_revisions()
    assert (head, set(known)) == _alembic(db.MIGRATIONS_DIR)
    assert len(known) >= 28


@pytest.mark.parametrize("down_line", [
    "down_revision = '0001'  # the initial store",
    "down_revision = (\n    '0001',\n)",  # a tuple wrapped over lines, as a formatter writes one
    'down_revision: str | None = "0001"',
])
def test_code_revisions_read_any_layout_alembic_reads(tmp_path: Path, down_line: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    (versions / "__init__.py").write_text("", encoding="utf-8")
    (versions / "0001_a.py").write_text(
        HEADER.format(doc="a", rev="0001", down="") + "revision = '0001'\ndown_revision = None\n"
        "branch_labels = None\ndepends_on = None\n" + BODY, encoding="utf-8")
    (versions / "0002_b.py").write_text(
        HEADER.format(doc="b", rev="0002", down="0001") + f"revision = '0002'\n{down_line}\n"
        "branch_labels = None\ndepends_on = None\n" + BODY, encoding="utf-8")
    expected = _alembic(tmp_path / "migrations")
    assert expected == ("0002", {"0001", "0002"})
    monkeypatch.setattr(db, "MIGRATIONS_DIR", tmp_path / "migrations")
    db.code_revisions.cache_clear()
    try:
        head, known = db.code_revisions()
    finally:
        db.code_revisions.cache_clear()
    assert (head, set(known)) == expected
