"""The relay's tables (SQLAlchemy Core). The schema itself is created and changed only by the migrations in
`relay/store/migrations/versions`; this module mirrors the newest one for queries."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text, text

metadata = MetaData()

keys = Table(
    "keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("held", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("hook_secret", String(64), nullable=False),
    # Policies (`store.keys`): the models the key may use (a JSON list; null: all), requests that start work per
    # minute (null: no limit), when it stops working (null: never).
    Column("models", Text, nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("expires_at", Float, nullable=True),
    # The key's current rate window (its start, a whole minute) and the requests counted in it.
    Column("rate_window", Float, nullable=False, server_default="0"),
    Column("rate_count", Integer, nullable=False, server_default="0"),
    # The key's current upload window (its start) and the images uploaded in it (`api.uploads`).
    Column("upload_window", Float, nullable=False, server_default="0"),
    Column("upload_count", Integer, nullable=False, server_default="0"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("request_id", String(40), nullable=False),
    Column("key_id", String(32), ForeignKey("keys.id"), nullable=False),
    Column("model", String(64), nullable=False),
    Column("mode", String(8), nullable=False),
    Column("bot", String(16), nullable=False),
    Column("action", String(32), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("progress", Integer, nullable=False),
    Column("provider", String(64), nullable=True),
    Column("upstream_id", String(128), nullable=True),
    Column("upstream_image_url", Text, nullable=True),
    Column("buttons", Text, nullable=True),
    Column("error_code", String(32), nullable=True),
    Column("fail_reason", Text, nullable=True),
    Column("price", BigInteger, nullable=False),
    Column("hold_state", String(12), nullable=False),
    Column("parent_id", String(40), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("submitted_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("deadline_at", Float, nullable=False),
    Column("custom_id", Text, nullable=True),
    Column("client_state", Text, nullable=True),
    Column("notify_hook", Text, nullable=True),
    Column("result_text", Text, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("owner", String(200), nullable=True),  # the relay process that follows the job (`store.leases`)
    Column("lease_until", Float, nullable=True),
    # A confirmation (`submit/modal`) of the job is with the upstream until then: no other may start meanwhile.
    Column("confirming_until", Float, nullable=True),
    # When a confirmation of the job was written: whichever process follows it, it never waits in MODAL again.
    Column("confirmed_at", Float, nullable=True),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_request", "request_id"),
    Index("ix_jobs_key_created", "key_id", "created_at"),
    Index("ix_jobs_provider_upstream", "provider", "upstream_id"),
    Index("ix_jobs_parent", "parent_id"),
    Index("ix_jobs_owner", "owner"),
)

# A client's attempt at a request, found again by its retries (`store.attempts`).
attempts = Table(
    "attempts",
    metadata,
    Column("fingerprint", String(64), primary_key=True),
    Column("request_id", String(40), nullable=False),
    Column("state", String(12), nullable=False),
    Column("job_ids", Text, nullable=False),
    Column("spec", Text, nullable=False),
    Column("deadline_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # A digest of the body of an attempt that named an `Idempotency-Key`: that key with another body is refused.
    Column("body", String(64), nullable=True),
    # When a retry that started afresh (`store.attempts.claim_many`) last claimed the fingerprint: kept when a newer
    # attempt's row is written over it (an attempt's own begin never writes it).
    Column("claimed_at", Float, nullable=True),
    Index("ix_attempts_created", "created_at"),
)

# The attempts a retry took the body over from (`store.attempts`): one of them whose jobs are held only later sends
# nothing. Kept for the retry window, as attempts are.
attempts_taken_over = Table(
    "attempts_taken_over",
    metadata,
    Column("request_id", String(40), primary_key=True),
    Column("created_at", Float, nullable=False),
    Index("ix_attempts_taken_over_created", "created_at"),
)

# The relay processes on a PostgreSQL database that can be told gone at once (`store.presence`): each holds an
# advisory lock with its `lock_key` while its listening connection lives.
processes = Table(
    "processes",
    metadata,
    Column("owner", String(200), primary_key=True),
    Column("lock_key", BigInteger, nullable=False),
    Column("started_at", Float, nullable=False),
)

# The last change of each provider's health, as whichever relay process made it last recorded it (`store.health`).
provider_health = Table(
    "provider_health",
    metadata,
    Column("provider", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("since", Float, nullable=False),
    Column("cooling_until", Float, nullable=True),
    Column("reason", Text, nullable=False),
    Column("process", String(200), nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Every movement of credits, appended in the transaction that makes it and never changed (`store.ledger`).
LEDGER_KINDS = ("topup", "hold", "capture", "release", "adjust")
ledger = Table(
    "ledger",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(8), nullable=False),
    Column("key_id", String(32), ForeignKey("keys.id"), nullable=False),
    Column("job_id", String(40), nullable=True),
    Column("amount", BigInteger, nullable=False),
    Column("model", String(64), nullable=True),
    Column("action", String(32), nullable=True),
    Column("note", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Index("ix_ledger_key_created", "key_id", "created_at"),
    Index("ix_ledger_key_id", "key_id", "id"),
    Index("ix_ledger_job", "job_id"),
    Index("ix_ledger_created", "created_at"),
    # A job has at most one outcome: the database itself refuses a second capture or release.
    Index(
        "ux_ledger_outcome",
        "job_id",
        unique=True,
        sqlite_where=text("kind IN ('capture', 'release')"),
        postgresql_where=text("kind IN ('capture', 'release')"),
    ),
)
