"""The committed contract artefacts match the models, and the public surface is explicit."""

from __future__ import annotations
import __future__

import enum
import inspect
import json
import types
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel

import contracts
import contracts.records
from contracts.export import (
    ERROR_CODES_MD,
    SCHEMA_DIR,
    main,
    render_error_codes_md,
    render_schemas,
    schema_filename,
    stale_schema_files,
)
from contracts.records import SCHEMA_MODELS, CESubmission

# Copied verbatim from SPEC §3 (the example a partner sends to POST /v1/records).
SPEC_EXAMPLE = """
{"source_record_id": "JD-2026-000123",
 "person": {"id_type": "resident_id", "id_number": "630102198704139126", "name": "赵伟",
            "employer_name": "海东市平安区第一中学", "region_code": "630200"},
 "year": 2026, "category": "professional", "activity_type": "training",
 "activity": {"title": "高原生态修复技术研修班", "mode": "offline",
              "started_on": "2026-05-10", "completed_on": "2026-05-13"},
 "claimed": {"quantity": "24", "unit": "hours", "details": {}},
 "evidence": {"certificate_no": "QH2026000123", "assessment": "passed"}}
"""

HINT = "models and committed files drifted: run `python -m contracts.export` and commit"


@pytest.mark.parametrize("filename", sorted(render_schemas()))
def test_committed_schema_matches_model(filename: str) -> None:
    path = SCHEMA_DIR / filename
    assert path.is_file(), f"{path} missing; {HINT}"
    assert path.read_text(encoding="utf-8") == render_schemas()[filename], HINT


def test_every_schema_model_has_a_file_and_no_stale_files() -> None:
    assert set(render_schemas()) == {schema_filename(n) for n in SCHEMA_MODELS}
    assert {"CERecord", "CESubmission"} <= set(SCHEMA_MODELS)
    assert stale_schema_files() == [], HINT


def test_committed_error_codes_doc_matches_catalogue() -> None:
    assert ERROR_CODES_MD.read_text(encoding="utf-8") == render_error_codes_md(), HINT


def test_export_check_passes_on_committed_tree(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"]) == 0
    assert capsys.readouterr().err == ""


def test_schema_files_are_pretty_sorted_utf8_with_trailing_newline() -> None:
    for filename, text in render_schemas().items():
        assert text.endswith("}\n"), filename
        assert "\\u" not in text, f"{filename}: ensure_ascii must be off"
        parsed = json.loads(text)
        assert text == json.dumps(parsed, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("name", ["CERecord", "CESubmission"])
def test_record_schemas_forbid_unknown_keys(name: str) -> None:
    schema = json.loads(render_schemas()[schema_filename(name)])
    assert schema.get("additionalProperties") is False
    for sub in ("Person", "Activity", "Claimed", "Evidence"):
        assert schema["$defs"][sub].get("additionalProperties") is False, sub


def test_submission_schema_leaves_out_gateway_owned_keys() -> None:
    schema = json.loads(render_schemas()[schema_filename("CESubmission")])
    for gateway_owned in ("record_id", "version", "withdrawn", "source", "credited_hours",
                          "rule_notes", "review_authority", "warnings"):
        assert gateway_owned not in schema["properties"]


def test_spec_example_validates() -> None:
    submission = CESubmission.model_validate_json(SPEC_EXAMPLE)
    assert submission.source_record_id == "JD-2026-000123"
    assert submission.person.name == "赵伟"
    assert submission.person.region_code == "630200"
    assert submission.claimed.quantity == Decimal("24")
    assert isinstance(submission.claimed.quantity, Decimal)
    assert submission.evidence.assessment == "passed"
    # The python path (a dict already parsed) agrees with the JSON path.
    assert CESubmission.model_validate(json.loads(SPEC_EXAMPLE)) == submission


# --- public surface -------------------------------------------------------------------------

EXPECTED_MODELS = {
    "Activity", "CERecord", "CESubmission", "Claimed", "Evidence", "Note", "Person",
    "RecordAnswer", "Source", "SubmissionBatch", "SubmissionResult",
}
EXPECTED_ENUMS = {
    "ActivityType", "Assessment", "Category", "IdType", "Mode", "RecordStatus", "Unit",
}
# The one non-type export: the contract version number the models describe.
EXPECTED_CONSTANTS = {"CONTRACT_VERSION"}


def test_all_is_exactly_the_models_and_enums() -> None:
    assert sorted(contracts.__all__) == sorted(EXPECTED_MODELS | EXPECTED_ENUMS | EXPECTED_CONSTANTS)
    assert len(contracts.__all__) == len(set(contracts.__all__)), "duplicates in __all__"


def test_all_covers_every_public_model_and_enum_in_records() -> None:
    defined = {
        name
        for name, obj in vars(contracts.records).items()
        if not name.startswith("_")
        and inspect.isclass(obj)
        and obj.__module__ == contracts.records.__name__
        and issubclass(obj, BaseModel | enum.Enum)
    }
    assert defined == EXPECTED_MODELS | EXPECTED_ENUMS


@pytest.mark.parametrize("name", sorted(EXPECTED_MODELS | EXPECTED_ENUMS | EXPECTED_CONSTANTS))
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from contracts import {name}", namespace)  # the import statement is the test
    assert namespace[name] is getattr(contracts, name)
    if name in EXPECTED_MODELS:
        assert issubclass(getattr(contracts, name), BaseModel)
    if name in EXPECTED_ENUMS:
        assert issubclass(getattr(contracts, name), enum.Enum)


def test_nothing_else_public_is_exported() -> None:
    public = {
        name
        for name, obj in vars(contracts).items()
        if not name.startswith("_")
        # Submodules become package attributes once imported; they are not exports.
        and not isinstance(obj, types.ModuleType)
        # `from __future__ import annotations` leaves a compiler flag behind.
        and obj is not __future__.annotations
    }
    assert public == set(contracts.__all__)


def test_export_check_fails_on_drift_and_writing_repairs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contracts.export as export

    schema_dir = tmp_path / "schema"
    doc = tmp_path / "docs" / "error-codes.md"
    monkeypatch.setattr(export, "SCHEMA_DIR", schema_dir)
    monkeypatch.setattr(export, "ERROR_CODES_MD", doc)

    assert main(["--check"]) == 1  # nothing written yet
    assert main([]) == 0
    assert main(["--check"]) == 0

    target = schema_dir / schema_filename("CERecord")
    target.write_text(target.read_text(encoding="utf-8").replace('"title"', '"titel"', 1),
                      encoding="utf-8")
    assert main(["--check"]) == 1

    stale = schema_dir / schema_filename("Retired")
    stale.write_text("{}\n", encoding="utf-8")
    assert main([]) == 0
    assert not stale.exists()
    assert main(["--check"]) == 0
