"""Every SPEC §6 code is in the catalogue, with both messages and the right severity."""

from __future__ import annotations

import re

import pytest

from contracts.errors import CATALOGUE, CodeInfo, ErrorCode, Severity, message

# SPEC §6, written out literally: a code that disappears or is renamed fails here.
SPEC_ERRORS = [
    "SCHEMA",
    "ID_NUMBER_INVALID",
    "REGION_UNKNOWN",
    "PUBLIC_SUBJECT_SOURCE",
    "ACTIVITY_NOT_COUNTABLE",
    "BASE_NOT_RECOGNIZED",
    "PLAN_NOT_FILED",
    "ASSESSMENT_FAILED",
    "OUTSIDE_YEAR",
    "YEAR_CLOSED",
    "SCOPE_VIOLATION",
    "CONFLICT_WITH_EXISTING",
    "DOWNSTREAM_REJECTED",
    "RETRIES_EXHAUSTED",
    "UNAUTHENTICATED",
    "REPLAYED",
    "PAYLOAD_TOO_LARGE",
]
SPEC_WARNINGS = [
    "TITLE_APPLICANT_LATE",
    "CAP_APPLIED",
    "ID_REGION_UNKNOWN",
    "USCC_INVALID",
]
INTEGRITY_PREFIX = "INTEGRITY_"

CJK = re.compile(r"[\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]")


def _check_messages(info: CodeInfo) -> None:
    assert info.message_en.strip(), f"{info.code}: empty English message"
    assert info.message_zh.strip(), f"{info.code}: empty Chinese message"
    assert LATIN.search(info.message_en), f"{info.code}: English message has no words"
    assert not CJK.search(info.message_en), f"{info.code}: English message contains CJK"
    assert CJK.search(info.message_zh), f"{info.code}: Chinese message has no CJK characters"


@pytest.mark.parametrize("code", SPEC_ERRORS)
def test_spec_error_code_is_catalogued(code: str) -> None:
    info = CATALOGUE[code]
    assert info.code == code
    assert info.severity is Severity.ERROR
    _check_messages(info)


@pytest.mark.parametrize("code", SPEC_WARNINGS)
def test_spec_warning_code_is_catalogued(code: str) -> None:
    info = CATALOGUE[code]
    assert info.code == code
    assert info.severity is Severity.WARNING
    _check_messages(info)


def test_integrity_family_exists_and_is_all_warnings() -> None:
    integrity = [info for code, info in CATALOGUE.items() if code.startswith(INTEGRITY_PREFIX)]
    assert integrity, "SPEC §6 names INTEGRITY_* warnings; the catalogue has none"
    for info in integrity:
        assert info.severity is Severity.WARNING, info.code
        _check_messages(info)


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_every_catalogued_code_is_well_formed(code: str) -> None:
    info = CATALOGUE[code]
    assert info.code == code
    assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", code)
    _check_messages(info)
    if info.severity is Severity.WARNING:
        assert info.http_status is None, "a warning never changes the HTTP answer"
    elif info.http_status is not None:
        assert 400 <= info.http_status < 500, "the gateway's own answers are client errors"


@pytest.mark.parametrize(
    ("code", "status"),
    [("SCHEMA", 422), ("UNAUTHENTICATED", 401), ("REPLAYED", 401), ("PAYLOAD_TOO_LARGE", 413),
     ("SCOPE_VIOLATION", 403)],
)
def test_request_level_errors_have_their_http_status(code: str, status: int) -> None:
    assert CATALOGUE[code].http_status == status


def test_delivery_outcomes_are_not_http_answers() -> None:
    assert CATALOGUE["DOWNSTREAM_REJECTED"].http_status is None
    assert CATALOGUE["RETRIES_EXHAUSTED"].http_status is None


def test_codes_only_ever_reported_inside_an_answer_have_no_http_status() -> None:
    """Neither is ever the status of a whole request.

    A conflict is one record's answer inside a 200; a control-totals mismatch fails an
    accepted (202) batch.
    """
    assert CATALOGUE["CONFLICT_WITH_EXISTING"].http_status is None
    assert CATALOGUE["CONTROL_TOTALS_MISMATCH"].http_status is None


def test_error_code_enum_mirrors_catalogue() -> None:
    assert [member.value for member in ErrorCode] == list(CATALOGUE)
    assert ErrorCode("SCHEMA") == "SCHEMA"


def test_message_returns_english_then_chinese() -> None:
    en, zh = message("ASSESSMENT_FAILED")
    assert (en, zh) == (CATALOGUE["ASSESSMENT_FAILED"].message_en,
                        CATALOGUE["ASSESSMENT_FAILED"].message_zh)
    assert CJK.search(zh) and not CJK.search(en)


def test_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        message("NO_SUCH_CODE")


def test_messages_are_distinct() -> None:
    english = [info.message_en for info in CATALOGUE.values()]
    chinese = [info.message_zh for info in CATALOGUE.values()]
    assert len(set(english)) == len(english)
    assert len(set(chinese)) == len(chinese)


def test_a_codes_other_status_is_what_its_raiser_answers_and_the_doc_shows_it() -> None:
    """YEAR_CLOSED is 422 for a partner's record, 409 when an operator's resolution is refused.

    The operator's refusal is an ``OpsConflict`` (``gateway/ops/records.py``); the catalogue
    names its status beside the partner's, and ``docs/error-codes.md`` prints both.
    """
    from contracts.export import render_error_codes_md
    from gateway.ops.common import OpsConflict

    others = {c: i.other_status for c, i in CATALOGUE.items() if i.other_status}
    assert set(others) == {"YEAR_CLOSED"}
    assert CATALOGUE["YEAR_CLOSED"].http_status == 422
    assert others["YEAR_CLOSED"].startswith(f"{OpsConflict.status_code} from ")
    assert "/v1/conflicts/{record_id}/resolve" in others["YEAR_CLOSED"]
    [row] = [line for line in render_error_codes_md().splitlines()
             if line.startswith("| `YEAR_CLOSED` |")]
    assert row.split(" | ")[2] == f"422; {others['YEAR_CLOSED']}"
