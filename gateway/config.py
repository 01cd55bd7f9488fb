"""One typed configuration for the whole gateway (pydantic-settings, ``CE_GATEWAY_`` prefix).

Nothing else in the code base reads ``os.environ``; components receive a :class:`Settings`.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SQLITE = "sqlite:///" + str(Path("var") / "ce_gateway.sqlite3")
# 5 s … 10 h, about a day in all (SPEC §5 "in the spirit of 5 s … 10 h over about a day").
DEFAULT_RETRY_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 36000, 36000)


# Known to anyone with the source: partner secrets sealed with it are not secret.  Fine for
# `make demo` and a laptop; `serve` refuses it on any address but loopback.
DEV_SECRET_KEY = "dev-only-change-me-ce-gateway-secret-key"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CE_GATEWAY_", extra="ignore")

    database_url: str = DEFAULT_SQLITE
    downstream_url: str = "http://127.0.0.1:8780"
    downstream_timeout_seconds: float = 10.0
    cadre_college_url: str = "http://127.0.0.1:8781"
    delivery_batch_size: Annotated[int, Field(ge=1, le=500)] = 500
    retry_schedule: Annotated[tuple[int, ...], NoDecode] = DEFAULT_RETRY_SCHEDULE
    delivery_max_attempts: int | None = None
    delivery_poll_seconds: float = 0.5
    delivery_lease_seconds: float = 60.0
    inline_retries: Annotated[int, Field(ge=1, le=10)] = 3
    inline_retry_max_wait_seconds: float = 5.0
    circuit_failure_threshold: int = 5
    circuit_reset_seconds: float = 30.0
    year_close: str = "12-30"
    # Years the department extended: "2026=2027-03-31,2025=2026-01-15" (a closing date per year).
    year_close_extensions: Annotated[dict[int, date], NoDecode] = Field(default_factory=dict)
    plan_filing_deadline: str = "07-31"  # R9: plans filed (备案) by this day of the year
    title_applicant_deadline: str = "11-30"  # R12: title applicants finish by this day
    timezone: str = "Asia/Shanghai"
    pull_interval_seconds: int = 300
    reference_sync_interval_seconds: int = 3600  # 0 turns the scheduled sync off
    # Retention (gateway/retention.py): a delivered version's payload becomes a stub this many
    # days after delivery (0 = never).  400 ≈ 13 months: a full annual cycle (year close,
    # annual batch, reconciliation, disputes) after delivery, plus a month.  The audit trail
    # is never pruned.  The ``retention`` job runs every RETENTION_INTERVAL_SECONDS (0 = off).
    retention_payload_days: Annotated[int, Field(ge=0)] = 400
    retention_interval_seconds: Annotated[int, Field(ge=0)] = 86400
    # The Cadre Network College pull (gateway/pull/): page size, pages per scheduled run,
    # in-call retries of one page (Retry-After beyond the wait cap ends the run instead).
    pull_page_size: Annotated[int, Field(ge=1, le=1000)] = 500
    pull_max_pages_per_run: Annotated[int, Field(ge=1)] = 200
    pull_timeout_seconds: float = 30.0
    pull_retries: Annotated[int, Field(ge=1, le=10)] = 4
    pull_retry_max_wait_seconds: float = 30.0
    # Cluster-wide job leases (gateway/scheduling.py): renewed while the job runs.
    job_lease_seconds: Annotated[float, Field(gt=0)] = 120.0
    # Alerts (gateway/alerts.py): a WeCom (企业微信) or DingTalk (钉钉) group robot webhook.
    # The ``alerts`` job runs every ALERT_INTERVAL_SECONDS while a URL is set (0 = off).
    alert_webhook_url: str | None = None
    alert_webhook_format: Literal["wecom", "dingtalk"] = "wecom"
    alert_webhook_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 5.0
    alert_interval_seconds: float = 60.0
    # The previous month's batch of a monthly partner (health, finance) must exist by this
    # day of the month (5 → late from the 6th); 0 = by the end of the month itself.
    alert_monthly_push_day: Annotated[int, Field(ge=0, le=28)] = 5
    alert_backlog_age_seconds: Annotated[float, Field(gt=0)] = 3600.0
    # Deliveries still failing (retrying or dead) this many days before the year close.
    alert_year_close_days: Annotated[int, Field(ge=0)] = 7
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)
    signature_window_seconds: int = 300
    max_records_per_request: int = 1000
    max_body_bytes: int = 16 * 1024 * 1024
    # Per-partner rate limit (gateway/ratelimit.py): signed requests a minute per app key,
    # shared by every replica through the store; RATE_LIMIT_BURST may come at once.
    # 0 turns it off.
    rate_limit_per_minute: Annotated[int, Field(ge=0)] = 600
    rate_limit_burst: Annotated[int, Field(ge=1)] = 600
    log_level: str = "INFO"
    # Batch files (health, finance, rosters): kept here until processed.  With several
    # replicas this must be a shared volume (docs/operations.md).
    batch_dir: Path = Path("var") / "batches"
    max_batch_bytes: int = 1024 * 1024 * 1024
    # Data rows in one batch file (header and blank rows not counted): more is 413 at upload
    # (gateway/api/routes/batches.py), before anything is stored.
    max_batch_rows: Annotated[int, Field(ge=1)] = 2_000_000
    batch_chunk_rows: Annotated[int, Field(ge=1, le=20_000)] = 2000
    batch_lease_seconds: float = 120.0
    # A processor that commits no chunk for this long is stuck (a hung read, a wedged parse
    # pool): it stops renewing its lease, so another processor resumes the batch.
    batch_stall_seconds: Annotated[float, Field(gt=0)] = 900.0
    # Claims of one batch without a chunk committed before it is failed (BATCH_FAILED): a
    # transient store error or a killed parse worker is tried again, a file that kills its
    # processor every time is not taken first after every restart for ever.
    batch_max_attempts: Annotated[int, Field(ge=1)] = 5
    # Parse worker processes for large batch files: -1 = one per core but one (the database
    # writer keeps its core), 0 = parse in the processing thread.
    batch_parse_workers: int = -1
    batch_parse_min_bytes: int = 4 * 1024 * 1024
    # Credit → hour tables (SPEC §4 defaults; documented in docs/error-codes.md notes).
    health_hours_per_credit: Decimal = Decimal("3.6")
    finance_hours_per_credit: Decimal = Decimal("1")

    @field_validator("retry_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            return tuple(int(float(p)) for p in parts)
        return value

    @field_validator("year_close_extensions", mode="before")
    @classmethod
    def _parse_extensions(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [p.strip().partition("=") for p in value.split(",") if p.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError("YEAR_CLOSE_EXTENSIONS is YEAR=YYYY-MM-DD[,YEAR=YYYY-MM-DD…]")
            return {int(year): date.fromisoformat(day.strip()) for year, _, day in pairs}
        return value

    @field_validator("year_close_extensions")
    @classmethod
    def _extension_after_year(cls, value: dict[int, date]) -> dict[int, date]:
        for year, day in value.items():
            if day.year < year:
                raise ValueError(f"YEAR_CLOSE_EXTENSIONS: {year} cannot close in {day.year}")
        return value

    @field_validator("retry_schedule")
    @classmethod
    def _non_empty(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(v < 0 for v in value):
            raise ValueError("RETRY_SCHEDULE needs at least one non-negative number of seconds")
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
