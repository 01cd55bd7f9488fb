"""Settings: what a deployment may set, and how a refused or unknown variable is named.

The review's cases (tests/integration/test_ops_jobs_review.py) pin the values that must be
refused; these pin the other side — realistic values still pass, the defaults are valid — and
the bilingual, secret-free wording the CLI prints (gateway/cli/common.py ``_settings``).
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import Settings, setting_errors, unknown_variables

CJK = re.compile(r"[\u4e00-\u9fff]")


def _errors(**values: object) -> list[tuple[str, str, str]]:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    return [(e.variable, e.detail, e.detail_zh) for e in setting_errors(caught.value)]


def test_the_defaults_are_valid_settings() -> None:
    defaults = Settings.model_construct()
    Settings.model_validate(defaults.model_dump())


@pytest.mark.parametrize(("name", "value"), [
    ("year_close", "12-31"), ("year_close", "02-29"), ("plan_filing_deadline", "08-01"),
    ("timezone", "UTC"), ("timezone", "Asia/Urumqi"), ("health_hours_per_credit", Decimal("4")),
    ("delivery_poll_seconds", 3600), ("delivery_lease_seconds", 0.5), ("job_lease_seconds", 3600),
    ("retention_payload_days", 3650), ("retention_payload_days", 0),
    ("signature_window_seconds", 10), ("max_records_per_request", 2),
    ("inline_retry_max_wait_seconds", 0), ("pull_interval_seconds", 0), ("log_level", "warning"),
    ("retry_schedule", "0,1,36000"), ("secret_key", "k"),
])
def test_values_a_deployment_or_a_test_uses_are_taken(name: str, value: object) -> None:
    Settings(**{name: value})  # type: ignore[arg-type]


def test_a_month_day_is_written_back_as_mm_dd() -> None:
    assert Settings(year_close="7-31").year_close == "07-31"
    assert Settings(title_applicant_deadline=" 11-30 ").title_applicant_deadline == "11-30"


@pytest.mark.parametrize(("values", "variable"), [
    ({"delivery_batch_size": "0"}, "CE_GATEWAY_DELIVERY_BATCH_SIZE"),
    ({"retry_schedule": "5,30,abc"}, "CE_GATEWAY_RETRY_SCHEDULE"),
    ({"retry_schedule": "1e400"}, "CE_GATEWAY_RETRY_SCHEDULE"),  # an OverflowError inside
    ({"retry_schedule": "5,99999999"}, "CE_GATEWAY_RETRY_SCHEDULE"),
    ({"year_close": "12/30"}, "CE_GATEWAY_YEAR_CLOSE"),
    ({"timezone": "Asia"}, "CE_GATEWAY_TIMEZONE"),
    ({"downstream_timeout_seconds": "inf"}, "CE_GATEWAY_DOWNSTREAM_TIMEOUT_SECONDS"),
    ({"delivery_poll_seconds": "nan"}, "CE_GATEWAY_DELIVERY_POLL_SECONDS"),
    ({"alert_webhook_format": "slack"}, "CE_GATEWAY_ALERT_WEBHOOK_FORMAT"),
    ({"log_level": "LOUD"}, "CE_GATEWAY_LOG_LEVEL"),
    ({"delivery_max_attempts": "0"}, "CE_GATEWAY_DELIVERY_MAX_ATTEMPTS"),
    ({"year_close_extensions": "2026:2027-03-31"}, "CE_GATEWAY_YEAR_CLOSE_EXTENSIONS"),
])
def test_each_refusal_names_its_variable_in_both_languages(values: dict[str, object],
                                                          variable: str) -> None:
    [(named, en, zh)] = _errors(**values)
    assert named == variable
    assert en.strip() and not CJK.search(en), en
    assert CJK.search(zh), zh
    given = str(next(iter(values.values()))).split(",")[-1]
    assert given in en and given in zh  # what the operator typed, to find it


def test_a_bad_step_of_the_retry_schedule_is_named_by_its_place() -> None:
    [(_, en, zh)] = _errors(retry_schedule="5,99999999")
    assert en.startswith("Item 2: input should be less than or equal to 2592000")
    assert zh.startswith("第 2 项应不大于 2592000")


def test_a_bound_reads_as_a_number_in_chinese() -> None:
    [(_, en, zh)] = _errors(job_lease_seconds="1e308")
    assert "86400" in en and "应不大于 86400；" in zh


def test_keys_and_urls_are_never_echoed() -> None:
    assert _errors(secret_key="  ")[0][0] == "CE_GATEWAY_SECRET_KEY"
    assert _errors(person_key_secret="  ")[0][0] == "CE_GATEWAY_PERSON_KEY_SECRET"
    for name, value in (("secret_key", ""), ("person_key_secret", ""), ("person_key_secret", 5),
                        ("database_url", 5), ("alert_webhook_url", 7)):
        for _, en, zh in _errors(**{name: value}):
            assert "got" not in en and "实际为" not in zh


def test_unknown_variables_are_named_with_the_setting_they_resemble() -> None:
    environ = {
        "CE_GATEWAY_DELIVERY_BATCH_SIZ": "100",        # a misspelling
        "ce_gateway_database_url": "sqlite://",        # read: pydantic-settings ignores case
        "CE_GATEWAY_SOMETHING_ELSE": "1",
        "CE_GATEWAY_TEST_POSTGRES_URL": "postgresql://",  # the test suite's own
        "CE_GATEWAY_SERVICE_HOST": "10.0.0.1",         # Kubernetes, for a Service "ce-gateway"
        "CE_GATEWAY_PORT": "tcp://10.0.0.1:8000",
        "CE_GATEWAY_PORT_8000_TCP_ADDR": "10.0.0.1",
        "OTHER_DELIVERY_BATCH_SIZE": "1",
    }
    assert unknown_variables(environ) == [
        ("CE_GATEWAY_DELIVERY_BATCH_SIZ", "CE_GATEWAY_DELIVERY_BATCH_SIZE"),
        ("CE_GATEWAY_SOMETHING_ELSE", None)]


@pytest.mark.parametrize(("name", "value"), [
    ("downstream_url", "https://ce.example.gov.cn/api"), ("cadre_college_url", "http://10.1.2.3:8781"),
    ("alert_webhook_url", "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=k"),
    ("database_url", "postgresql://gw:pw@[::1]:5432/ce"), ("database_url", "sqlite://"),
])
def test_service_and_database_urls_that_work_pass(name: str, value: str) -> None:
    assert getattr(Settings(**{name: value}), name) == value  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "value"), [
    ("downstream_url", "ce.internal:8780"), ("cadre_college_url", "ftp://host/"),
    ("alert_webhook_url", "https:///robot/send"), ("downstream_url", "http://host:80x"),
    ("database_url", "postgresql://gw:Secr3t@db:54x2/ce"), ("database_url", "postgresql://gw:Secr3t@db:70000/ce"),
    ("database_url", "no url at all"),
])
def test_a_url_that_cannot_work_is_refused_without_echoing_it(name: str, value: str) -> None:
    [(variable, en, zh)] = _errors(**{name: value})
    assert variable == f"CE_GATEWAY_{name.upper()}"
    assert CJK.search(zh) and "Secr3t" not in en + zh and value not in en + zh


@pytest.mark.parametrize("name", ["database_url", "downstream_url"])
def test_a_url_pasted_with_white_space_around_it_is_read_without_it(name: str) -> None:
    url = "postgresql://gw:pw@db:5432/ce" if name == "database_url" else "https://ce.internal/api"
    assert getattr(Settings(**{name: f" {url}\n"}), name) == url  # type: ignore[arg-type]


def test_an_empty_alert_webhook_url_is_no_webhook() -> None:
    assert Settings(alert_webhook_url=" ").alert_webhook_url is None


def test_a_relative_batch_dir_is_made_absolute_against_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(batch_dir="shared/../batches").batch_dir == tmp_path / "batches"  # type: ignore[arg-type]
    assert Settings(batch_dir="/srv/ce/batches").batch_dir == Path("/srv/ce/batches")  # type: ignore[arg-type]
