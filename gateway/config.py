"""One typed configuration for the whole gateway (pydantic-settings, ``CE_GATEWAY_`` prefix).

Nothing else in the code base reads ``os.environ``; components receive a :class:`Settings`.

Every value is checked when :class:`Settings` is built, so a deployment that cannot work fails
at start naming the variable (the CLI prints ``CONFIG_INVALID``, see :func:`setting_errors`),
never later as a failed batch or a job's traceback every tick.  The bounds are far from any
real deployment's values: they refuse what cannot work (a zero timeout, a negative poll, a
credit worth nothing) and keep every ``timedelta`` built from a setting finite.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SQLITE = "sqlite:///" + str(Path("var") / "ce_gateway.sqlite3")
# 5 s … 10 h, about a day in all (SPEC §5 "in the spirit of 5 s … 10 h over about a day").
DEFAULT_RETRY_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 36000, 36000)


# Known to anyone with the source: partner secrets sealed with it are not secret.  Fine for
# `make demo` and a laptop; `serve` refuses it on any address but loopback.
DEV_SECRET_KEY = "dev-only-change-me-ce-gateway-secret-key"
# The same for PERSON_KEY_SECRET: person keys made with it are as guessable as plain digests.
DEV_PERSON_KEY_SECRET = "dev-only-change-me-ce-gateway-person-key-secret"

# Why each secret setting must not be empty (en, zh).
_WHAT_A_SECRET_KEYS: Mapping[str, tuple[str, str]] = {
    "secret_key": ("Must not be empty: partner secrets are sealed with it",
                   "不能为空：合作方密钥以它加密保存"),
    "person_key_secret": ("Must not be empty: every stored person key is keyed with it",
                          "不能为空：存储的人员标识均以它加密生成"),
}

ENV_PREFIX = "CE_GATEWAY_"
MINUTE, HOUR, DAY = 60, 3600, 86400

# Bounds shared by settings of one kind (seconds unless named otherwise).
# A timeout: 0 fails every call at once; over 10 minutes a hung peer holds a worker for ever.
Timeout = Annotated[float, Field(gt=0, le=10 * MINUTE)]
# A lease or stall limit: 0 lapses as it is taken; a day is far beyond any renewal period.
Lease = Annotated[float, Field(gt=0, le=DAY)]
# A wait between tries inside one call (0: retry at once).
Wait = Annotated[float, Field(ge=0, le=HOUR)]
# How often a scheduled job runs (0 turns it off); a month at most.
Interval = Annotated[int, Field(ge=0, le=30 * DAY)]
# A credit → hour rate (SPEC §4): 0 would credit nothing, a negative rate refuse every row.
HoursPerCredit = Annotated[Decimal, Field(gt=0, le=100)]
# One step of RETRY_SCHEDULE: 0 (at once) to 30 days.
RetryStep = Annotated[int, Field(ge=0, le=30 * DAY)]


def _invalid(en: str, zh: str) -> PydanticCustomError:
    """A validator's refusal with its Chinese beside it (read back by :func:`setting_errors`)."""
    return PydanticCustomError("setting_invalid", "{en}", {"en": en, "zh": zh})


class Settings(BaseSettings):
    # extra="ignore": pydantic-settings never sees unknown CE_GATEWAY_* names anyway; the CLI
    # names them in a warning (unknown_variables).
    # allow_inf_nan=False: "inf" or "nan" is no timeout, lease or rate.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", allow_inf_nan=False)

    database_url: str = DEFAULT_SQLITE
    downstream_url: str = "http://127.0.0.1:8780"
    downstream_timeout_seconds: Timeout = 10.0
    cadre_college_url: str = "http://127.0.0.1:8781"
    delivery_batch_size: Annotated[int, Field(ge=1, le=500)] = 500
    retry_schedule: Annotated[tuple[RetryStep, ...], NoDecode] = DEFAULT_RETRY_SCHEDULE
    delivery_max_attempts: Annotated[int | None, Field(ge=1)] = None
    # The delivery worker's pause when there is nothing to send: 0 or less polls without pause.
    delivery_poll_seconds: Annotated[float, Field(gt=0, le=HOUR)] = 0.5
    delivery_lease_seconds: Lease = 60.0
    inline_retries: Annotated[int, Field(ge=1, le=10)] = 3
    inline_retry_max_wait_seconds: Wait = 5.0
    circuit_failure_threshold: Annotated[int, Field(ge=1)] = 5
    circuit_reset_seconds: Wait = 30.0
    year_close: str = "12-30"
    # Years the department extended: "2026=2027-03-31,2025=2026-01-15" (a closing date per year).
    year_close_extensions: Annotated[dict[int, date], NoDecode] = Field(default_factory=dict)
    plan_filing_deadline: str = "07-31"  # R9: plans filed (备案) by this day of the year
    title_applicant_deadline: str = "11-30"  # R12: title applicants finish by this day
    timezone: str = "Asia/Shanghai"
    pull_interval_seconds: Interval = 300
    reference_sync_interval_seconds: Interval = 3600  # 0 turns the scheduled sync off
    # Retention (gateway/retention.py): a delivered version's payload becomes a stub this many
    # days after delivery (0 = never).  400 ≈ 13 months: a full annual cycle (year close,
    # annual batch, reconciliation, disputes) after delivery, plus a month.  The audit trail
    # is never pruned.  The ``retention`` job runs every RETENTION_INTERVAL_SECONDS (0 = off).
    retention_payload_days: Annotated[int, Field(ge=0, le=36_500)] = 400  # a century at most
    retention_interval_seconds: Interval = 86400
    # The Cadre Network College pull (gateway/pull/): page size, pages per scheduled run,
    # in-call retries of one page (Retry-After beyond the wait cap ends the run instead).
    pull_page_size: Annotated[int, Field(ge=1, le=1000)] = 500
    pull_max_pages_per_run: Annotated[int, Field(ge=1)] = 200
    pull_timeout_seconds: Timeout = 30.0
    pull_retries: Annotated[int, Field(ge=1, le=10)] = 4
    pull_retry_max_wait_seconds: Wait = 30.0
    # Cluster-wide job leases (gateway/scheduling.py): renewed while the job runs.
    job_lease_seconds: Lease = 120.0
    # Alerts (gateway/alerts.py): a WeCom (企业微信) or DingTalk (钉钉) group robot webhook.
    # The ``alerts`` job runs every ALERT_INTERVAL_SECONDS while a URL is set (0 = off).
    alert_webhook_url: str | None = None
    alert_webhook_format: Literal["wecom", "dingtalk"] = "wecom"
    alert_webhook_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 5.0
    alert_interval_seconds: Annotated[float, Field(ge=0, le=30 * DAY)] = 60.0
    # The previous month's batch of a monthly partner (health, finance) must exist by this
    # day of the month (5 → late from the 6th); 0 = by the end of the month itself.
    alert_monthly_push_day: Annotated[int, Field(ge=0, le=28)] = 5
    alert_backlog_age_seconds: Annotated[float, Field(gt=0, le=365 * DAY)] = 3600.0
    # Deliveries still failing (retrying or dead) this many days before the year close.
    alert_year_close_days: Annotated[int, Field(ge=0, le=366)] = 7
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    # Keys every stored person_key (gateway/person_keys.py): not SECRET_KEY, which may be
    # rotated; this one is fixed for the store's life (the store keeps a check of it).
    person_key_secret: SecretStr = SecretStr(DEV_PERSON_KEY_SECRET)
    # Accepted clock skew and nonce memory (SPEC §7: 300 s); 0 or less refuses every request.
    signature_window_seconds: Annotated[int, Field(ge=1, le=DAY)] = 300
    max_records_per_request: Annotated[int, Field(ge=1, le=100_000)] = 1000
    max_body_bytes: Annotated[int, Field(ge=1)] = 16 * 1024 * 1024
    # Per-partner rate limit (gateway/ratelimit.py): signed requests a minute per app key,
    # shared by every replica through the store; RATE_LIMIT_BURST may come at once.
    # 0 turns it off.
    rate_limit_per_minute: Annotated[int, Field(ge=0)] = 600
    rate_limit_burst: Annotated[int, Field(ge=1)] = 600
    log_level: str = "INFO"
    # Batch files (health, finance, rosters): kept here until processed.  With several
    # replicas this must be a shared volume (docs/operations.md).
    batch_dir: Path = Path("var") / "batches"
    max_batch_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024 * 1024
    # Data rows in one batch file (header and blank rows not counted): more is 413 at upload
    # (gateway/api/routes/batches.py), before anything is stored.
    max_batch_rows: Annotated[int, Field(ge=1)] = 2_000_000
    batch_chunk_rows: Annotated[int, Field(ge=1, le=20_000)] = 2000
    batch_lease_seconds: Lease = 120.0
    # A processor that commits no chunk for this long is stuck (a hung read, a wedged parse
    # pool): it stops renewing its lease, so another processor resumes the batch.
    batch_stall_seconds: Lease = 900.0
    # Claims of one batch without a chunk committed before it is failed (BATCH_FAILED): a
    # transient store error or a killed parse worker is tried again, a file that kills its
    # processor every time is not taken first after every restart for ever.
    batch_max_attempts: Annotated[int, Field(ge=1)] = 5
    # Parse worker processes for large batch files: -1 = one per core but one (the database
    # writer keeps its core), 0 = parse in the processing thread.
    batch_parse_workers: Annotated[int, Field(ge=-1, le=256)] = -1
    batch_parse_min_bytes: Annotated[int, Field(ge=0)] = 4 * 1024 * 1024
    # Credit → hour tables (SPEC §4 defaults; documented in docs/error-codes.md notes).
    health_hours_per_credit: HoursPerCredit = Decimal("3.6")
    finance_hours_per_credit: HoursPerCredit = Decimal("1")

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return tuple(int(float(p)) for p in parts)
            except (ValueError, OverflowError):  # "abc", "nan"; "1e400" is an OverflowError
                raise _invalid("Expected comma-separated whole seconds, e.g. 5,30,120",
                               "应为以逗号分隔的秒数，如 5,30,120") from None
        return value

    @field_validator("year_close", "plan_filing_deadline", "title_applicant_deadline")
    @classmethod
    def _month_day(cls, value: str) -> str:
        """``MM-DD``, a day some year has (02-29 falls back to 02-28 in a common year)."""
        match = re.fullmatch(r"(\d{1,2})-(\d{1,2})", value.strip())
        month, day = (int(match[1]), int(match[2])) if match else (0, 0)
        try:
            date(2024, month, day)  # a leap year, as gateway.pipeline.rules_tables.on reads it
        except ValueError:
            raise _invalid("Expected a day of the year as MM-DD, e.g. 12-30",
                           "应为 MM-DD 格式的日期，如 12-30") from None
        return f"{month:02d}-{day:02d}"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise _invalid("Expected an IANA time zone, e.g. Asia/Shanghai",
                           "应为 IANA 时区名称，如 Asia/Shanghai") from None
        return value

    @field_validator("secret_key", "person_key_secret")
    @classmethod
    def _secret_given(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        if not value.get_secret_value().strip():
            raise _invalid(*_WHAT_A_SECRET_KEYS[info.field_name or ""])
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        """A URL SQLAlchemy can read: a port that is no number would escape as a ValueError later.

        The driver is checked where the engine is made (``ce-gateway`` names a missing one).
        The refusal never quotes the URL: it may hold a password.
        """
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        value = value.strip()  # a value pasted with a space or a line break around it
        try:
            port = make_url(value).port
        except (ArgumentError, ValueError):
            port = -1
        if port is not None and not 0 < port < 65536:
            raise _invalid("Expected a database URL such as postgresql://user:password@host:5432/db "
                           "or sqlite:///path/to/file.sqlite3 (a port is a number, 1-65535)",
                           "应为数据库 URL，如 postgresql://user:password@host:5432/db 或 "
                           "sqlite:///path/to/file.sqlite3（端口为 1–65535 的数字）")
        return value

    @field_validator("alert_webhook_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # An empty CE_GATEWAY_ALERT_WEBHOOK_URL= turns alerts off, as leaving it unset does.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("downstream_url", "cadre_college_url", "alert_webhook_url")
    @classmethod
    def _service_url(cls, value: str | None) -> str | None:
        """An http(s) URL with a host: "host:8780" alone fails every call, a day of retries later."""
        if value is None:
            return value
        try:
            parts = urlsplit(value.strip())
            _ = parts.port  # a port that is no number raises ValueError
        except ValueError:
            parts = urlsplit("")
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise _invalid("Expected an http:// or https:// URL with a host, "
                           "e.g. https://host.internal:8443/path",
                           "应为带主机名的 http:// 或 https:// URL，如 https://host.internal:8443/path")
        return value.strip()

    @field_validator("batch_dir")
    @classmethod
    def _absolute_dir(cls, value: Path) -> Path:
        """Resolved against the working directory once, at start: the batch row stores the path.

        A relative path stored in a row would be opened against whatever directory the worker
        that claims the batch runs in.  Not ``resolve()``: a shared volume's mount point is kept
        as written, symbolic links and all, so it reads the same on every machine.
        """
        return Path(os.path.abspath(value))

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.strip().upper() not in logging.getLevelNamesMapping():
            raise _invalid("Expected a logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL",
                           "应为日志级别：DEBUG、INFO、WARNING、ERROR 或 CRITICAL")
        return value.strip()

    @field_validator("year_close_extensions", mode="before")
    @classmethod
    def _parse_extensions(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [p.strip().partition("=") for p in value.split(",") if p.strip()]
            try:
                if any(not sep for _, sep, _ in pairs):
                    raise ValueError(value)
                return {int(year): date.fromisoformat(day.strip()) for year, _, day in pairs}
            except ValueError:
                raise _invalid("YEAR_CLOSE_EXTENSIONS is YEAR=YYYY-MM-DD[,YEAR=YYYY-MM-DD…], "
                               "e.g. 2026=2027-03-31",
                               "应为 年度=YYYY-MM-DD[,…] 格式，如 2026=2027-03-31") from None
        return value

    @field_validator("year_close_extensions")
    @classmethod
    def _extension_after_year(cls, value: dict[int, date]) -> dict[int, date]:
        for year, day in value.items():
            if day.year < year:
                raise _invalid(f"{year} cannot close in {day.year}, a year before it",
                               f"{year} 年度不能在其之前的 {day.year} 年截止")
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _non_empty(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise _invalid("Expected at least one number of seconds, e.g. 5,30,120",
                           "至少应有一个秒数，如 5,30,120")
        return value

    @property
    def max_attempts(self) -> int:
        """Attempts before dead-lettering: the schedule's steps plus the first try, unless set."""
        return self.delivery_max_attempts or len(self.retry_schedule) + 1

    def retry_delay(self, attempts_done: int) -> int:
        """Seconds to wait after the ``attempts_done``-th failed attempt (1-based)."""
        index = min(max(attempts_done - 1, 0), len(self.retry_schedule) - 1)
        return self.retry_schedule[index]

    # A monthly partner's (health, finance) full-year batch of year Y must exist by this day of
    # January Y+1 (15 → late from the 16th); 0 = by 31 December itself (gateway/alerts.py).
    alert_annual_push_day: Annotated[int, Field(ge=0, le=31)] = 15


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# -- what the CLI tells an operator about the environment ------------------------------------------

# Values never echoed back in an error: a key, or a URL that may carry a password or a token.
_UNECHOED = frozenset({"secret_key", "person_key_secret", "database_url", "downstream_url",
                       "cadre_college_url", "alert_webhook_url"})

# Chinese for pydantic's own error types; a validator here gives its own (``_invalid``).
_ZH: Mapping[str, str] = {
    "greater_than": "应大于 {gt}", "greater_than_equal": "应不小于 {ge}",
    "less_than": "应小于 {lt}", "less_than_equal": "应不大于 {le}",
    "int_parsing": "应为整数", "int_from_float": "应为整数", "int_type": "应为整数",
    "float_parsing": "应为数字", "float_type": "应为数字", "finite_number": "应为有限的数字",
    "decimal_parsing": "应为数字", "decimal_type": "应为数字", "bool_parsing": "应为 true 或 false",
    "literal_error": "应为以下之一：{expected}", "string_too_short": "不能为空",
}


@dataclass(frozen=True)
class SettingError:
    """One refused setting: the ``CE_GATEWAY_`` variable and what is wrong, in both languages."""

    variable: str
    detail: str
    detail_zh: str


def _plain(value: object) -> str:
    """A bound or choice as a Chinese sentence shows it (``86400``, not ``86400.0``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).replace(" or ", "、")


def setting_errors(exc: ValidationError) -> list[SettingError]:
    """Each error of a failed :class:`Settings`, named by its environment variable.

    The value is quoted back (it is what the operator typed) except for keys and URLs.
    """
    found = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        ctx: dict[str, Any] = dict(error.get("ctx") or {})
        en = str(error["msg"])
        zh = str(ctx["zh"]) if "zh" in ctx else _ZH.get(error["type"], "").format_map(
            {k: _plain(v) for k, v in ctx.items()}) or f"取值无效（{en}）"
        if len(error["loc"]) > 1 and isinstance(error["loc"][1], int):  # RETRY_SCHEDULE's nth step
            step = error["loc"][1] + 1
            en, zh = f"Item {step}: {en[:1].lower()}{en[1:]}", f"第 {step} 项{zh}"
        if name and name not in _UNECHOED and isinstance(error.get("input"), str | int | float):
            got = repr(str(error["input"])[:60])
            en, zh = f"{en}; got {got}", f"{zh}；实际为 {got}"
        found.append(SettingError(ENV_PREFIX + name.upper(), f"{en}.", f"{zh}。"))
    return found


# CE_GATEWAY_* names that are no setting on purpose: the test suite's knobs, and what Kubernetes
# injects for a Service named ce-gateway (CE_GATEWAY_SERVICE_HOST, CE_GATEWAY_PORT_8000_TCP …).
_NOT_SETTINGS = re.compile(r"CE_GATEWAY_(TEST_.*|SOAK|WALK_SEEDS|WALK_STEPS|SERVICE_.*|PORT(_.*)?)")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``(variable, the setting it most resembles or None)`` for each unread CE_GATEWAY_* name.

    A misspelt variable is otherwise dropped silently and the default runs.
    pydantic-settings matches names case-insensitively, so this does too.
    """
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = []
    for variable in sorted(os.environ if environ is None else environ):
        upper = variable.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known and not _NOT_SETTINGS.fullmatch(upper):
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
            unknown.append((variable, close[0] if close else None))
    return unknown
