"""SQLAlchemy Core tables of the gateway's store (one schema for SQLite and PostgreSQL).

The hot paths (ingest, outbox claim) use Core statements on these tables, not the ORM (STYLE.md:
ORM ``add_all`` is 3–5× slower).  Alembic migrations under ``migrations/`` create them; a test
checks that the migrated schema and this metadata agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no time zones of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime refused: the store keeps aware times only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # pragma: no cover - defensive, SQLite returns datetime
            value = datetime.fromisoformat(value)
        when: datetime = value
        if when.tzinfo is None:
            return when.replace(tzinfo=UTC)
        return when.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

partners = Table(
    "partners",
    metadata,
    Column("partner_id", String(64), primary_key=True),
    Column("adapter", String(32), nullable=False),
    Column("base_code", String(64)),
    Column("app_key", String(64), nullable=False, unique=True),
    Column("secret_enc", Text, nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", UTCDateTime, nullable=False),
    # When ``partner disable`` turned it off (migration 0025); ``active`` is what refuses it.
    Column("disabled_at", UTCDateTime),
)

operators = Table(
    "operators",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    # When ``operator revoke`` ended its token (migration 0025): the token hash was replaced
    # then, so the token and its console sessions are refused by code before 0025 too.
    Column("revoked_at", UTCDateTime),
)

# Console sessions ended by logging out, kept until they would have expired anyway: the
# cookie is signed, not stored, so a copy of it must be refused by its session id.
console_logouts = Table(
    "console_logouts",
    metadata,
    Column("sid", String(64), primary_key=True),
    Column("expires_at", Integer, nullable=False),  # unix seconds, the session's own expiry
)

nonces = Table(
    "nonces",
    metadata,
    Column("app_key", String(64), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("seen_at", UTCDateTime, nullable=False, index=True),
    PrimaryKeyConstraint("app_key", "nonce"),
)

# Records held as another record's repeat or conflict (not counted): the SQL text of the
# partial index below, and of the queries that must match it to use it.
HELD = "status IN ('duplicate', 'conflict')"

# One row per partner record; its versions live in record_versions.
records = Table(
    "records",
    metadata,
    Column("record_id", String(32), primary_key=True),
    Column("partner_id", String(64), nullable=False),
    Column("adapter", String(32), nullable=False),
    Column("source_record_id", String(64), nullable=False),
    Column("current_version", Integer, nullable=False),
    # accepted | duplicate | conflict  (withdrawal is a version with withdrawn = true)
    Column("status", String(16), nullable=False),
    Column("withdrawn", Boolean, nullable=False, default=False),
    Column("duplicate_of", String(32)),
    Column("natural_key", String(64), nullable=False),  # looked up in natural_keys
    Column("content_hash", String(64), nullable=False),
    Column("person_key", String(64), nullable=False),
    Column("year", Integer, nullable=False),
    Column("batch_id", String(64)),
    Column("completed_on", Date),
    Column("last_batch_id", String(40)),  # the last batch that carried it (reconciliation)
    # What the rules decided for the current version (issue 4): the compliance read-model and
    # the caps ledger read these instead of parsing payloads.
    Column("category", String(16)),
    Column("activity_type", String(24)),
    Column("counts_year", Integer),  # the CE year it counts toward (Y, or Y+1 when deferred)
    Column("hours", String(16)),  # hours after conversion, before caps
    Column("credited_hours", String(16)),  # after caps
    Column("cap_type", String(16)),
    Column("review_authority", String(32)),
    Column("reference_version", String(32)),
    # R14 across records: offline spans and time claimed, to flag overlaps and > 24 h a day.
    Column("mode", String(8)),
    Column("started_on", Date),
    Column("time_hours", String(16)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # R7: a national competition award that covers the tenure's professional hours (四(二)5);
    # the compliance read-model counts it from its year on.  It reads the current payload's
    # rule note while there is one (an older replica's correction leaves this column stale) and
    # trusts this column once retention pruned the payload.  Null: written before 0023.
    Column("covers_professional", Boolean),
    # After a restore from a backup (``ce-gateway db restored``, migration 0026): its next
    # version is numbered at least this, past any number the management system may already hold
    # from before the disaster (gateway.pipeline.versions).  Null: never restored.
    Column("version_floor", Integer),
    UniqueConstraint("partner_id", "source_record_id"),
    Index("ix_records_batch_id", "batch_id"),
    # R14 reads a person's records of a CE year by completion day; caps and compliance by prefix.
    Index("ix_records_person_year_day", "person_key", "counts_year", "completed_on"),
    # An activity's held reports: one takes over when its holder lets the activity go.
    Index("ix_records_held_key", "natural_key", postgresql_where=text(HELD),
          sqlite_where=text(HELD)),
)

record_versions = Table(
    "record_versions",
    metadata,
    Column("record_id", String(32), nullable=False),
    Column("version", Integer, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("payload", Text, nullable=False),  # the CERecord as JSON
    Column("batch_id", String(40)),  # the batch whose row made this version
    Column("created_at", UTCDateTime, nullable=False),
    # Retention (issue 5): a delivered version's payload is replaced by a stub after
    # RETENTION_PAYLOAD_DAYS; its hash, dates and audit events stay.
    Column("pruned_at", UTCDateTime),
    PrimaryKeyConstraint("record_id", "version"),
)

# The first record that claimed a natural key (id number, year, activity, completion date).
natural_keys = Table(
    "natural_keys",
    metadata,
    Column("natural_key", String(64), primary_key=True),
    Column("record_id", String(32), nullable=False),
)

# The batches that carried a record again unchanged (a ``duplicate`` of its own stored
# version): with ``records.batch_id`` (the first carrier) and ``record_versions.batch_id`` (the
# batch of each version), reconciliation knows every batch that carried a record.
batch_repeats = Table(
    "batch_repeats",
    metadata,
    Column("batch_id", String(40), nullable=False),
    Column("record_id", String(32), nullable=False),
    PrimaryKeyConstraint("batch_id", "record_id"),
)

rejections = Table(
    "rejections",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("partner_id", String(64), nullable=False, index=True),
    Column("adapter", String(32), nullable=False),
    Column("source_record_id", String(64)),
    Column("batch_id", String(64)),
    Column("row_no", BigInteger),  # its batch file's row (null: no batch, or written before 0028)
    Column("payload", Text, nullable=False),  # the raw submission, as received
    Column("errors", Text, nullable=False),  # JSON list of notes
    Column("status", String(16), nullable=False, default="open"),
    Column("received_at", UTCDateTime, nullable=False, index=True),
    # The partner's other submissions of a source id (revalidation replays only its last word)
    Index("ix_rejections_partner_id_source_record_id", "partner_id", "source_record_id"),
    # A batch's status counts and marks the rows revalidation let through since (batch_status),
    # from the index alone: partners poll it, and a batch may hold 100,000s of rejections
    Index("ix_rejections_batch_id_status_row_no", "batch_id", "status", "row_no"),
)

# A group of outbox rows sent together under one Idempotency-Key, retried as a whole.
delivery_batches = Table(
    "delivery_batches",
    metadata,
    Column("batch_key", String(40), primary_key=True),
    Column("status", String(16), nullable=False),  # pending | done
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_until", UTCDateTime),
    Column("last_error", Text),
    Column("parent_key", String(40)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_delivery_batches_due", "status", "next_attempt_at"),
)

_UNBATCHED = "status = 'pending' AND batch_key IS NULL"

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("record_id", String(32), nullable=False),
    Column("version", Integer, nullable=False),
    # pending | delivered | dead
    Column("status", String(16), nullable=False),
    Column("batch_key", String(40)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error_code", String(32)),
    Column("last_error", Text),
    Column("receipt_status", String(16)),
    Column("receipt_no", String(64)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime),
    # When an operator last queued the row again (reprocess); NULL: queued when created.  The
    # backlog's age is measured from here, so an old dead letter sent again is not "late".
    Column("queued_at", UTCDateTime),
    UniqueConstraint("record_id", "version"),
    Index("ix_outbox_status_batch", "status", "batch_key"),
    # What forming a delivery batch scans: pending rows in no batch yet.  Partial, so its cost
    # stays the same however many delivered rows lie behind it (measured: 22 ms → 2 ms a claim
    # at 10,000 pending behind 90,000 delivered on PostgreSQL).
    Index("ix_outbox_unbatched", "id", postgresql_where=text(_UNBATCHED),
          sqlite_where=text(_UNBATCHED)),
)

DEAD_EVENTS = "kind = 'dead'"
audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("event_id", String(32), nullable=False),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("record_id", String(32), index=True),
    Column("version", Integer),
    Column("actor", String(64), nullable=False),
    Column("detail", Text, nullable=False),  # canonical JSON, identity numbers masked
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # Dead-lettering events only: the alerts' commit-ordered dead-letter mark (gateway/alerts.py).
    Index("ix_audit_events_dead", "seq", postgresql_where=text(DEAD_EVENTS),
          sqlite_where=text(DEAD_EVENTS)),
)

# One row: the chain's head.  Appenders lock it (SELECT … FOR UPDATE) so the chain stays
# linear across processes; verify compares it with the last event, so truncation shows.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("last_hash", String(64), nullable=False),
)

# -- batches, pulls and cluster-wide jobs (issue 3) ---------------------------------------------

# An uploaded file: committed (file on disk + this row) before the 202; processed in chunks whose
# commits advance ``rows_done`` in the same transaction, so a crash resumes without duplicates.
batches = Table(
    "batches",
    metadata,
    Column("batch_id", String(40), primary_key=True),
    Column("partner_id", String(64), nullable=False, index=True),
    Column("adapter", String(32), nullable=False),
    Column("kind", String(16), nullable=False),  # monthly | annual | roster
    Column("period", String(7), nullable=False),  # YYYY-MM or YYYY
    Column("status", String(16), nullable=False),  # queued | processing | done | failed
    Column("file_path", Text, nullable=False),
    Column("file_format", String(8), nullable=False),  # csv | xlsx | ndjson
    Column("file_size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("declared_rows", BigInteger),
    Column("declared_credits", String(32)),
    Column("rows_done", BigInteger, nullable=False, default=0),
    Column("rows_total", BigInteger),
    Column("accepted", BigInteger, nullable=False, default=0),
    Column("duplicate", BigInteger, nullable=False, default=0),
    Column("corrected", BigInteger, nullable=False, default=0),
    Column("conflict", BigInteger, nullable=False, default=0),
    Column("rejected", BigInteger, nullable=False, default=0),
    Column("credits_total", Text, nullable=False, default="0"),
    Column("error", Text),
    # A failed batch's coded reason (SPEC §6): the code and the Chinese beside ``error``.
    Column("error_code", String(32)),
    Column("error_zh", Text),
    Column("lease_owner", String(64)),
    Column("lease_until", UTCDateTime),
    # Claims since the batch last committed a chunk (BatchProcessor: BATCH_MAX_ATTEMPTS).
    Column("attempts", Integer, nullable=False, default=0, server_default="0"),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    # When retention deleted the finished batch's file from BATCH_DIR (gateway/retention.py).
    Column("file_removed_at", UTCDateTime),
    Index("ix_batches_adapter_period", "adapter", "period"),
)

batch_errors = Table(
    "batch_errors",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("batch_id", String(40), nullable=False),
    Column("row_no", BigInteger, nullable=False),
    Column("column_name", String(64)),
    Column("code", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("message_zh", Text, nullable=False),
    # A batch's status pages its row errors by id (batch_status): found in order, not sorted
    Index("ix_batch_errors_batch_id_id", "batch_id", "id"),
)

# Incremental pulls (the Cadre Network College): the cursor advances in the same transaction
# as the records it produced.
pull_state = Table(
    "pull_state",
    metadata,
    Column("source", String(32), primary_key=True),
    Column("cursor", Text),
    Column("pulled_total", BigInteger, nullable=False, default=0),
    Column("last_error", Text),
    Column("last_success_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    # Reference kinds: digests of the items stamped at ``cursor`` (an inclusive ``since``) that
    # the last sync took, so a sync skips them when they come again unchanged.  JSON
    # {"since": cursor, "items": [...]}; ignored when ``since`` is not the cursor any more.
    Column("seen", Text),
)

# Cluster-wide leases for scheduled jobs: whoever holds a name's lease runs that job.
job_locks = Table(
    "job_locks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("owner", String(64)),
    Column("until", UTCDateTime),
)

# -- reference data (SPEC §4, last paragraph; gateway/reference.py) ----------------------------

# One row per change set: a sync that changed something, or a CSV import.  Its ``version_id``
# ("ref-000012") is what the rules write beside a judgement, so ops can see which reference
# data judged a record.  Watermarks live in ``pull_state`` rows named ``reference:<kind>``.
reference_versions = Table(
    "reference_versions",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("version_id", String(16), nullable=False, unique=True),
    Column("source", String(8), nullable=False),  # sync | import
    Column("kinds", String(64), nullable=False),  # the kinds it changed, comma-separated
    Column("actor", String(64), nullable=False),
    Column("counts", Text, nullable=False),  # JSON: kind → {inserted, updated, ...}
    Column("cursors", Text),  # JSON: kind → upstream ``since`` watermark after a sync
    Column("created_at", UTCDateTime, nullable=False),
)

# The current row per natural key, with the version that last changed it.
reference_bases = Table(
    "reference_bases",
    metadata,
    Column("code", String(64), primary_key=True),
    Column("name", Text, nullable=False),
    Column("level", String(16), nullable=False),  # national | provincial
    Column("status", String(16), nullable=False),  # active | revoked
    Column("assessed_on", Date, nullable=False),
    Column("version", String(16), nullable=False),
)

reference_plans = Table(
    "reference_plans",
    metadata,
    Column("plan_id", String(64), primary_key=True),
    Column("base_code", String(64), nullable=False),
    Column("title", Text, nullable=False),
    Column("category", String(16), nullable=False),
    Column("hours", String(32), nullable=False),  # Decimal as text, never float
    Column("starts_on", Date, nullable=False),
    Column("ends_on", Date, nullable=False),
    Column("filed_on", Date, nullable=False),
    Column("version", String(16), nullable=False),
)

# Identity numbers are never stored in clear: ``person_key`` is the keyed digest records keep
# too (gateway/person_keys.py) and ``id_masked`` is for display only.
reference_deferrals = Table(
    "reference_deferrals",
    metadata,
    Column("person_key", String(64), nullable=False),
    Column("from_year", Integer, nullable=False),
    Column("id_masked", String(32), nullable=False),
    Column("reason", String(16), nullable=False),  # post_transfer | illness | pregnancy
    Column("approved_on", Date, nullable=False),
    Column("version", String(16), nullable=False),
    PrimaryKeyConstraint("person_key", "from_year"),
)

reference_title_applicants = Table(
    "reference_title_applicants",
    metadata,
    Column("person_key", String(64), nullable=False),
    Column("year", Integer, nullable=False),
    Column("id_masked", String(32), nullable=False),
    Column("version", String(16), nullable=False),
    PrimaryKeyConstraint("person_key", "year"),
)

# Every change of every reference row: which version said what (payloads hold no clear ids).
reference_history = Table(
    "reference_history",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("key", String(160), nullable=False),
    Column("version", String(16), nullable=False),
    Column("payload", Text, nullable=False),  # JSON of the stored row
    Column("at", UTCDateTime, nullable=False),
    Index("ix_reference_history_kind_key", "kind", "key"),
)


# -- caps ledger (issue 4, R10) ------------------------------------------------------------------

# One row per person, CE year and capped activity type.  Ingest locks it (SELECT … FOR UPDATE)
# before re-allocating that group's hours, so two replicas crediting papers for one person at
# the same moment queue here instead of both crediting the last free hours.
caps_ledger = Table(
    "caps_ledger",
    metadata,
    Column("person_key", String(64), nullable=False),
    Column("year", Integer, nullable=False),
    Column("cap_type", String(16), nullable=False),
    Column("credited", String(16), nullable=False, default="0"),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("person_key", "year", "cap_type"),
)

# A record whose current version the management system refused for good (DOWNSTREAM_REJECTED)
# while it still counts an earlier, applied version: where and how much that version counts.
# Written when the refusal lands; the record's ``records`` row says where its *current* version
# would count, which a refused correction may have moved to another person, year or type.  The
# cap group and the compliance report of the applied version's person read it (R10, R1); it is
# dropped when a later version of the record is sent or its refused delivery is queued again.
refused_pins = Table(
    "refused_pins",
    metadata,
    Column("record_id", String(32), primary_key=True),
    Column("version", Integer, nullable=False),  # the applied version
    Column("person_key", String(64), nullable=False),
    Column("year", Integer, nullable=False),  # the CE year it counts toward there (deferral: next)
    Column("cap_type", String(16), nullable=True),  # None: an uncapped type
    Column("hours", String(16), nullable=False),  # its credited hours there
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_refused_pins_person_year", "person_key", "year"),
)


# Data repairs a migration queued for the code at its head (migration 0024, gateway/repairs.py):
# one row a repair, deleted in the repair's own transaction.  A row left means the upgrade is
# not finished (``gateway.store.db.revision_behind``).
store_repairs = Table(
    "store_repairs",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("queued_at", UTCDateTime, nullable=False),
    Column("reason", String(500), nullable=False),
)

# The store's check of PERSON_KEY_SECRET (gateway/person_keys.py): one row, the HMAC of a fixed
# label under the secret every ``person_key`` above was made with (migration 0020).  A process
# whose secret gives another value is refused (``serve``, ``worker``, ``/readyz``).
person_key_check = Table(
    "person_key_check",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("check_value", String(64), nullable=False),
)


# -- ops: alerts (issue 5) -----------------------------------------------------------------------

# One row per alert condition that fired ("missed_push:health:2026-10", "backlog_age", …): the
# row's presence is what keeps an alert from repeating every tick; when the condition clears the
# row gets ``cleared_at`` and a later recurrence fires again.
alert_state = Table(
    "alert_state",
    metadata,
    Column("key", String(160), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("fired_at", UTCDateTime, nullable=False),
    Column("cleared_at", UTCDateTime),
    Column("detail", Text, nullable=False),  # JSON, identity numbers masked
    # NULL while the claim's post is in flight (or its evaluator died): fired_at is its lease.
    Column("sent_at", UTCDateTime),
)


# -- partner rate limits (issue 6) ---------------------------------------------------------------

# One row per rate-limited key (a partner's app key): the GCRA "theoretical arrival time" in
# epoch milliseconds (gateway/ratelimit.py).  One UPSERT per signed request, shared by replicas.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("bucket", String(160), primary_key=True),
    Column("tat_ms", BigInteger, nullable=False),
)
