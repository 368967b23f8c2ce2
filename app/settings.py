"""Every setting of the service, read from the environment once and validated at start-up."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changethis", "changeme", "secret"}
# HS256 signs with HMAC-SHA256: a key shorter than the hash's 32 bytes weakens it (RFC 7518 3.2).
MIN_SECRET_BYTES = 32


class Phase(StrEnum):
    """Rollout phase of the migration, in order. The current one lives in the database
    (`dualwrite_phase`); `DUALWRITE_PHASE` only seeds it when the migration creates it."""

    JSONB_ONLY = "jsonb_only"
    DUAL_WRITE = "dual_write"
    VERIFY_READS = "verify_reads"
    READ_TABLE = "read_table"
    TABLE_ONLY = "table_only"

    @property
    def position(self) -> int:
        return list(Phase).index(self)


class BrokerKind(StrEnum):
    """Which broker `BROKER_URL` names: Celery's Redis transport or RabbitMQ (py-amqp)."""

    REDIS = "redis"
    AMQP = "amqp"


# URL schemes per broker kind; `memory://` is kombu's in-process transport, for producer tests.
BROKER_SCHEMES = {
    "redis": BrokerKind.REDIS,
    "rediss": BrokerKind.REDIS,
    "memory": BrokerKind.REDIS,
    "amqp": BrokerKind.AMQP,
    "amqps": BrokerKind.AMQP,
    "pyamqp": BrokerKind.AMQP,
}
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The quorum queues' `x-delivery-limit` (`app.topology.DELIVERY_LIMIT`, where the reason is).
AMQP_DELIVERY_LIMIT = 20


def broker_kind(url: str) -> BrokerKind:
    """The kind of broker a URL names (`redis://`, `amqp://`, ...); ValueError for any other."""
    scheme = url.partition("://")[0].lower()
    if scheme not in BROKER_SCHEMES:
        raise ValueError(f"BROKER_URL must be a redis:// or amqp:// URL, not {scheme or url!r}://")
    return BROKER_SCHEMES[scheme]


class LogFormat(StrEnum):
    """How every process writes its log lines (`app.logs`): for people, or one JSON object a
    line for a log pipeline."""

    TEXT = "text"
    JSON = "json"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    database_url: str = "postgresql://postgres@127.0.0.1:5432/chat_dualwrite"
    # The broker Celery uses: `redis://...` or `amqp://...` (RabbitMQ, quorum queues). Unset,
    # the broker is `REDIS_URL`, as before `BROKER_URL` existed.
    broker_url: str | None = None
    # A Redis for what is not the broker: with a Redis broker and no `BROKER_URL`, the broker
    # itself. With RabbitMQ it is optional, and unset nothing connects to Redis.
    redis_url: str | None = None
    # Optional here so that migrations and workers start without it; the API and the token
    # command refuse to start without a real one (`Settings.signing_secret`).
    auth_secret: SecretStr | None = None
    # Seeds the phase when revision 0005 creates it; after that, `python -m app phase set`.
    dualwrite_phase: Phase = Phase.DUAL_WRITE
    # Gates of `phase set` and `contract`: how long the current phase must have held.
    phase_gate_min_seconds: float = Field(default=3600.0, ge=0)
    contract_min_table_only_seconds: float = Field(default=7 * 86400.0, ge=0)
    # A `phase set` (and a `contract`) finishes or refuses within this bound, whatever the write
    # rate: its catch-up works through finite sets of chats, then holds every writer for the few
    # that are left, or refuses saying why.
    phase_step_timeout_seconds: float = Field(default=600.0, gt=0)
    # How long one try to take the phase for a change may queue (every write queues behind it
    # meanwhile); tries repeat, with backoff, until the step's timeout.
    phase_lock_wait_ms: int = Field(default=2_000, gt=0)
    # The longest a step may hold every writer while it converges the chats still behind, when
    # writes keep them behind as fast as the catch-up converges them (at its measured rate).
    phase_hold_max_seconds: float = Field(default=5.0, gt=0)

    # Every process (API, worker, beat, CLI) logs to stderr in this format, from this level up.
    log_format: LogFormat = LogFormat.TEXT
    log_level: str = "INFO"

    default_model: str = "default"
    max_request_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # JSON values (objects, arrays, strings, numbers, literals) a request body may hold, counted
    # before it is parsed: what decoding and validating it costs grows with them, not its bytes.
    max_request_nodes: int = Field(default=100_000, gt=0)
    # The API process's GIL switch interval (Python's default is 5 ms): how long a thread busy
    # in Python (parsing a large body) may make the event loop, and so every request, wait.
    api_gil_switch_seconds: float = Field(default=0.001, gt=0, le=0.1)
    # How deeply objects and arrays may nest in a message, the message itself being level 1.
    # Above about 255 levels pydantic can no longer serialize the message, so the cap is 250.
    max_message_depth: int = Field(default=64, ge=1, le=250)
    max_page_size: int = Field(default=500, gt=0)
    # What a chat may hold; a write that would take it past either is refused (413), nothing
    # stored. Bytes are its size uncompressed (`pg_column_size` of the detoasted value: what
    # every read, fork and copy handles), plus the new messages' JSON.
    max_chat_messages: int = Field(default=10_000, gt=0)
    max_chat_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # `/metrics` reads its database gauges (about six queries) at most this often; scrapes in
    # between show the last values.
    metrics_cache_seconds: float = Field(default=5.0, ge=0)
    # A directory of this process group's own, empty at its start (a tmpfs in compose): with it,
    # every process of an API instance (`uvicorn --workers`, gunicorn), or every prefork child
    # of a worker node, keeps its counts in files there and a scrape sums them all. prometheus_
    # client reads the variable itself when it is imported; it is declared here to be documented
    # and checked. Two API instances or two worker nodes never share one.
    prometheus_multiproc_dir: str | None = None
    # Each worker node's main process serves its node's metrics (`dualwrite_tasks_total`,
    # `dualwrite_rows_written_total`, `dualwrite_sync_lag_seconds`, labelled `node`) at
    # http://WORKER_METRICS_ADDRESS:WORKER_METRICS_PORT/metrics; 0 serves none. Under the
    # prefork pool it needs PROMETHEUS_MULTIPROC_DIR, or the children's counts cannot be seen.
    worker_metrics_port: int = Field(default=9540, ge=0, le=65535)
    worker_metrics_address: str = "0.0.0.0"
    # `/readyz` answers within `ready_timeout_seconds` whatever hangs (a probe's own timeout is
    # typically 1 s), and runs its checks (a database round trip, a broker PING) at most once
    # per `ready_cache_seconds`: a storm of probes costs the database one query a second.
    ready_timeout_seconds: float = Field(default=0.8, gt=0, le=30)
    ready_cache_seconds: float = Field(default=1.0, ge=0)

    # The API publishes after the commit from a background thread (`app.publisher`), never in
    # the request: a buffer of committed jobs, sent in batches. A full buffer drops (and counts)
    # jobs rather than block a request; the sweep repairs those chats. At shutdown the buffer
    # is drained for at most `publish_drain_seconds`.
    publish_buffer_size: int = Field(default=10_000, gt=0)
    publish_batch_size: int = Field(default=500, gt=0)
    publish_drain_seconds: float = Field(default=5.0, ge=0)
    # Each send gives up quickly, so that a broker that is down or hung stalls a batch (and the
    # sweep's or the CLI's publish) for well under a second: connect, socket and retry budget
    # are all bounded.
    publish_connect_timeout_seconds: float = Field(default=0.2, gt=0)
    publish_socket_timeout_seconds: float = Field(default=0.2, gt=0)
    publish_max_retries: int = Field(default=1, ge=0)
    publish_retry_interval_seconds: float = Field(default=0.05, ge=0)
    # While a sync of a chat waits in the queue, further changes of that chat send no new task.
    # A queued mark older than this no longer counts, so a task lost with its worker (unacked
    # until the visibility timeout) delays its chat at most this long: the sweep resends it.
    coalesce_ttl_seconds: int = Field(default=120, gt=0)
    # Producers' task-sent events (Flower's "sent" state); they double the cost of a send.
    task_sent_events: bool = False
    # Workers' task events (received, started, succeeded: Flower's task views). Each is a
    # publish by the worker's main process, about a quarter of a sync's worker CPU. Off, a
    # worker sends them only while Flower runs: Flower turns them on every few seconds.
    worker_task_events: bool = True
    # Task events go out in one publish per this many seconds at most (`tasks.consumer`), not
    # one per event: Flower shows a task that much later. 0 (the default): Celery's own, one per
    # loop turn. Opt-in: it changes when Celery's consumer publishes, and it has not been through
    # the chaos bench's broker kills yet.
    worker_task_events_flush_seconds: float = Field(default=0.0, ge=0, le=5)

    # The API's database limits. Every API connection carries these, so that no request holds a
    # pooled connection for long: a lock wait or a statement past its limit, or a transaction
    # left idle, ends with 503 and `Retry-After` instead of taking the pool from other users.
    api_statement_timeout_ms: int = Field(default=30_000, gt=0)
    api_lock_timeout_ms: int = Field(default=5_000, gt=0)
    api_idle_in_transaction_timeout_ms: int = Field(default=30_000, gt=0)
    # The API's pool, per process: connections kept, extra ones opened under load, and how long
    # a request waits for one before it is answered 503 with `Retry-After`.
    api_pool_size: int = Field(default=5, gt=0)
    api_pool_max_overflow: int = Field(default=5, ge=0)
    api_pool_timeout_seconds: float = Field(default=2.0, gt=0)
    # A request whose database connection died before its commit (a failover, a restart, a
    # pooler recycling connections) is run again this many times on a fresh connection.
    api_connection_retries: int = Field(default=2, ge=0, le=10)
    # What `Retry-After` says on a 503.
    api_retry_after_seconds: int = Field(default=1, ge=1)
    # Writes to one chat, per API process: this many hold (or wait for) a database connection
    # at once, the next `chat_write_queue` wait without one, in the event loop, for at most
    # `chat_write_wait_seconds`; any more, or a longer wait, get 503 with `Retry-After`. The
    # default, one writer and one waiting on the chat's row lock, keeps one user's burst on their
    # own chat from taking the pool (and the request threads) that every other user needs.
    chat_write_concurrency: int = Field(default=2, ge=1)
    chat_write_queue: int = Field(default=16, ge=0)
    chat_write_wait_seconds: float = Field(default=10.0, gt=0)
    # Requests of one user, per API process, that read a body or use the database (reads
    # included): this many at once, the next `user_queue` wait without a thread, a connection
    # or a body read, in the event loop, for at most `user_wait_seconds`; any more, or a longer
    # wait, get 503 with `Retry-After`. One user's storm on their own chat cannot hold the
    # request threads and the pool that every other user needs. The user's writes to one chat
    # then also pass that chat's gate, holding their place here.
    user_concurrency: int = Field(default=4, ge=1)
    user_queue: int = Field(default=8, ge=0)
    user_wait_seconds: float = Field(default=10.0, gt=0)
    # Bodies above 64 KiB are parsed one at a time per process (`app.api.body`); one waits this
    # long at most for its turn, then gets 503 with `Retry-After`.
    body_parse_wait_seconds: float = Field(default=5.0, gt=0)

    # Worker-side database limits: a sync never waits forever on a lock or a stuck transaction.
    worker_statement_timeout_ms: int = Field(default=60_000, gt=0)
    worker_lock_timeout_ms: int = Field(default=10_000, gt=0)
    worker_idle_in_transaction_timeout_ms: int = Field(default=60_000, gt=0)
    worker_work_mem: str = Field(default="64MB", pattern=r"^\d+\s*(kB|MB|GB)$")
    # Worker processes (prefork children) per worker. Celery's own default is the machine's CPU
    # count, which in a container is the host's, not the container's share: on a large host that
    # is dozens of children, each with its own database connections. A sync waits mostly on
    # PostgreSQL, so a few children keep a core busy; scale with more workers, not more children.
    worker_concurrency: int = Field(default=4, ge=1, le=64)
    # A child is replaced after this many tasks (0: never), and after a task that left it above
    # this resident size in KiB (0: no limit). CPython rarely gives memory back to the system,
    # so a child that once converged a very large chat keeps that peak for good; replacing it
    # costs a fork and a new database connection, nothing a task can notice.
    worker_max_tasks_per_child: int = Field(default=10_000, ge=0)
    worker_max_memory_per_child_kb: int = Field(default=512_000, ge=0)

    # Task limits and the broker's visibility timeout; checked against each other at start-up.
    task_soft_time_limit_seconds: int = Field(default=120, gt=0)
    task_time_limit_seconds: int = Field(default=150, gt=0)
    broker_visibility_timeout_seconds: int = Field(default=3600, gt=0)
    # RabbitMQ's `consumer_timeout` as the server has it (its default: 30 minutes). A delivery
    # not acked within it closes the worker's channel and is delivered again, so it must exceed
    # every acked-late task's time limit; a retry waits in RabbitMQ's delay queues, unacked by
    # no one, so no countdown counts against it.
    broker_consumer_timeout_seconds: int = Field(default=1800, gt=0)

    # Retries of a sync that failed on a transient error (see `app.retry`).
    retry_max_retries: int = Field(default=8, ge=0)
    retry_backoff_base_seconds: float = Field(default=2.0, gt=0)
    retry_backoff_max_seconds: float = Field(default=300.0, gt=0)
    retry_jitter: bool = True
    # A sync task also converges up to this many other chats that are behind and that no other
    # sync holds, in the same statement: under a backlog, one task does the work of many.
    sync_batch_extra: int = Field(default=25, ge=0, le=1000)
    # In table_only, how long a chat's reverse sync waits before it rewrites the JSONB from the
    # rows: the appends of that moment share one rewrite.
    reverse_sync_delay_seconds: float = Field(default=2.0, ge=0)
    # A task whose worker died under it (SIGKILL, OOM) is delivered again at most this often.
    max_redeliveries: int = Field(default=3, ge=0)

    # The online migration (`alembic upgrade head`). Each DDL on the chats table waits at most
    # `migration_lock_timeout_ms` for its lock (writers queue behind a waiting DDL), then
    # retries with backoff. The backfill copies chats in batches sized to a time budget, and
    # halves the batch and pauses longer when a batch overruns it.
    migration_lock_timeout_ms: int = Field(default=2000, gt=0)
    migration_lock_attempts: int = Field(default=30, gt=0)
    backfill_batch_size: int = Field(default=200, gt=0)
    # At most this many chats per batch: each takes a per-chat advisory lock, and PostgreSQL's
    # shared lock table holds max_locks_per_transaction x max_connections of them (6,400 by
    # default) for every session together.
    backfill_max_batch_size: int = Field(default=1000, gt=0, le=4000)
    backfill_batch_seconds: float = Field(default=2.0, gt=0)
    backfill_pause_seconds: float = Field(default=0.02, ge=0)
    backfill_log_interval_seconds: float = Field(default=5.0, ge=0)

    # The bulk passes on the worker fleet (`app/services/bulk_passes.py`). With
    # `backfill_on_workers`, `alembic upgrade head` does the DDL, records the copy as a pass of
    # chunks and returns; the workers on the maintenance queue copy. Without it (a single-machine
    # install), the upgrade copies everything itself, as before.
    backfill_on_workers: bool = False
    # Chunks queued or running at once across the whole fleet, counted in the database: the
    # headroom the bulk passes leave the database (each chunk is one busy connection).
    bulk_max_concurrent_chunks: int = Field(default=2, ge=1, le=64)
    # Chats per chunk (a keyset range of chat ids), and how long one run of a chunk may last
    # before it yields (its next run resumes after its last batch).
    bulk_chunk_chats: int = Field(default=1000, ge=1)
    bulk_chunk_seconds: float = Field(default=300.0, gt=0)
    # A batch statement of a backfill chunk runs at most this long (lock waits: the migration's
    # `MIGRATION_LOCK_TIMEOUT_MS`); past it, the batch is halved and tried again.
    bulk_statement_timeout_ms: int = Field(default=60_000, gt=0)
    # A queued chunk whose task has not started within this time (lost with the broker) is
    # queued again; a chunk claimed this many times without ending is failed (`backfill resume`
    # retries it).
    bulk_chunk_queued_ttl_seconds: float = Field(default=900.0, gt=0)
    bulk_chunk_max_attempts: int = Field(default=5, ge=1)
    # How often beat dispatches chunks (and takes back those lost with a worker).
    bulk_dispatch_interval_seconds: float = Field(default=60.0, gt=0)
    # The rolling full reconcile covers every chat at least once in this many nights: each
    # night releases 1/RECONCILE_FULL_DAYS of the chunks of the pass, after the last night's.
    reconcile_full_days: int = Field(default=1, ge=1, le=365)

    # The sweep: re-enqueue chats whose copy is behind (a lost publish, a lost task).
    sweep_interval_seconds: float = Field(default=60.0, gt=0)
    sweep_grace_seconds: float = Field(default=30.0, ge=0)
    sweep_batch_size: int = Field(default=5000, gt=0)

    # The reconcile: nightly over every chat (crontab, UTC), and often over recent changes.
    reconcile_crontab: str = "0 3 * * *"
    # Smaller batches sort and hash in memory: 200 compared faster than 500 (bench/reconcile.py).
    reconcile_batch_size: int = Field(default=200, gt=0)
    reconcile_time_limit_seconds: int = Field(default=6 * 3600, gt=0)
    reconcile_recent_interval_seconds: float = Field(default=900.0, gt=0)
    reconcile_recent_window_seconds: float = Field(default=3600.0, gt=0)
    # The reconcile's own database limits, set per batch transaction (not the worker's): a batch
    # that waits longer for a sync's chat lock, or runs longer, is retried in smaller pieces, and
    # a single chat that still hits them is dead-lettered (`reconcile_timeout`) while the run goes
    # on. A batch of 200 chats does far more work than one sync, hence the longer statement limit.
    reconcile_statement_timeout_ms: int = Field(default=120_000, gt=0)
    reconcile_lock_timeout_ms: int = Field(default=30_000, gt=0)

    # The rollout page `/ops/` on the API, behind HTTP basic auth: `user:password`, as Flower's
    # `--basic-auth`. Unset, the page answers 404.
    ops_basic_auth: SecretStr | None = None
    # How often the page reloads itself; 0 never.
    ops_refresh_seconds: int = Field(default=10, ge=0)
    # The worker nodes' metrics, comma-separated `http://host:WORKER_METRICS_PORT/metrics` URLs,
    # whose lag histograms the page adds up (each read with a 1 s timeout). Empty, the page
    # shows no lag and says where to find it.
    ops_worker_metrics_urls: str = ""

    @field_validator("reconcile_crontab")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("RECONCILE_CRONTAB must have five fields: minute hour day month dow")
        return value

    @field_validator("broker_url", "redis_url")
    @classmethod
    def _known_broker(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        broker_kind(value)
        return value.strip()

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("database_url")
    @classmethod
    def _normalize_dsn(cls, value: str) -> str:
        """Accept the usual `postgresql://` URL and pin SQLAlchemy to psycopg 3."""
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        raise ValueError("DATABASE_URL must be a postgresql:// URL")

    @field_validator("auth_secret")
    @classmethod
    def _reject_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if secret.lower() in PLACEHOLDER_SECRETS:
            raise ValueError("AUTH_SECRET must be a real secret, not a placeholder")
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(
                f"AUTH_SECRET must be at least {MIN_SECRET_BYTES} bytes for HS256 (it has "
                f"{len(secret.encode())}); make one with "
                "python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        return value

    @field_validator("ops_basic_auth")
    @classmethod
    def _user_and_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        user, colon, password = value.get_secret_value().partition(":")
        if not colon or not user or not password:
            raise ValueError("OPS_BASIC_AUTH must be user:password, both non-empty")
        if password.lower() in PLACEHOLDER_SECRETS:
            raise ValueError("OPS_BASIC_AUTH must have a real password, not a placeholder")
        return value

    @model_validator(mode="after")
    def _limits_fit(self) -> Settings:
        if self.task_soft_time_limit_seconds >= self.task_time_limit_seconds:
            raise ValueError("TASK_SOFT_TIME_LIMIT_SECONDS must be below TASK_TIME_LIMIT_SECONDS")
        if self.broker_kind is BrokerKind.AMQP:
            if self.max_redeliveries + 1 >= AMQP_DELIVERY_LIMIT:
                raise ValueError(
                    f"MAX_REDELIVERIES must be below {AMQP_DELIVERY_LIMIT - 1} with RabbitMQ, "
                    "whose quorum queues dead-letter a message handed back "
                    f"{AMQP_DELIVERY_LIMIT} times before the worker could record it"
                )
            if self.task_time_limit_seconds >= self.broker_consumer_timeout_seconds:
                raise ValueError(
                    "BROKER_CONSUMER_TIMEOUT_SECONDS (RabbitMQ's consumer_timeout) must exceed "
                    "TASK_TIME_LIMIT_SECONDS, or RabbitMQ closes a running task's channel and "
                    "delivers it again"
                )
            return self
        if self.task_time_limit_seconds >= self.broker_visibility_timeout_seconds:
            raise ValueError(
                "BROKER_VISIBILITY_TIMEOUT_SECONDS must exceed TASK_TIME_LIMIT_SECONDS, "
                "or a running task is redelivered to a second worker"
            )
        if self.bulk_chunk_seconds * 2 + 120 >= self.broker_visibility_timeout_seconds:
            raise ValueError(
                "BROKER_VISIBILITY_TIMEOUT_SECONDS must exceed twice BULK_CHUNK_SECONDS plus "
                "120 s (a chunk task's time limit), or a running chunk is delivered twice"
            )
        longest_wait = self.retry_backoff_max_seconds + self.task_time_limit_seconds
        if longest_wait >= self.broker_visibility_timeout_seconds:
            raise ValueError(
                "BROKER_VISIBILITY_TIMEOUT_SECONDS must exceed RETRY_BACKOFF_MAX_SECONDS plus "
                "TASK_TIME_LIMIT_SECONDS, or a retry waiting for its countdown is delivered twice"
            )
        return self

    @property
    def broker(self) -> str:
        """The broker's URL: `BROKER_URL`, else `REDIS_URL`, else the local Redis."""
        return self.broker_url or self.redis_url or DEFAULT_REDIS_URL

    @property
    def broker_kind(self) -> BrokerKind:
        return broker_kind(self.broker)

    @property
    def redis(self) -> str | None:
        """The Redis that direct clients (the worker metrics) use: `REDIS_URL`, else the broker
        when it is a Redis; None with RabbitMQ and no `REDIS_URL`."""
        url = self.redis_url
        if url is None and self.broker_kind is BrokerKind.REDIS:
            url = self.broker
        # kombu's in-process transport has no Redis behind it.
        return None if url is None or url.startswith("memory://") else url

    @property
    def signing_secret(self) -> str:
        if self.auth_secret is None:
            raise RuntimeError("AUTH_SECRET is not set: the API cannot verify tokens without it")
        return self.auth_secret.get_secret_value()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; built (and validated) on first use."""
    return Settings()
