"""`Relay`: every service of one running relay, wired together. The routes reach it through the app's state
(`relay.api.common.relay_of`); it lives in its own module so that `api` never imports `app`."""

from __future__ import annotations

import os
import secrets as secrets_module
import socket
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from adapters import Upstream
from relay import logs
from relay.api.common import Authenticator
from relay.clock import Clock
from relay.collector import Pauses
from relay.config import Config
from relay.core.broadcast import Broadcast
from relay.core.coordination import Coordinator
from relay.core.egress import Egress
from relay.core.events import JobEvents
from relay.core.finish import Finisher
from relay.core.jobs import JobService
from relay.core.lifecycle import Lifecycle
from relay.core.maybe_sent import MaybeSent
from relay.core.notify import Notifier
from relay.core.prober import Prober
from relay.core.providers import ProviderPool
from relay.core.references import ReferenceLoader
from relay.core.submit import Submitter
from relay.core.tasks import TaskService
from relay.core.tracker import Tracker
from relay.core.uploads import Uploads
from relay.core.upstream_hooks import UpstreamHooks
from relay.images import image_store, load_or_create_secret
from relay.metrics import Metrics
from relay.store import sqlite_inline
from relay.store.attempts import AttemptStore
from relay.store.db import Database
from relay.store.health import HealthStore
from relay.store.jobs import JobRow, JobStore
from relay.store.keys import KeyStore
from relay.store.leases import Leases
from relay.store.slots import Slots


class Relay:
    """Every service of one running relay, wired together."""

    def __init__(self, config: Config, clock: Clock, upstreams: dict[str, Upstream] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self.gc_pauses = Pauses(self.metrics.gc_paused)
        self.db = Database(
            config.database_url(),
            pool_size=config.database.pool_size,
            busy_ms=sqlite_inline.BUSY_MS,
            statement_timeout_s=config.database.statement_timeout_s,
        )
        self.keys = KeyStore(self.db.engine)
        # This process, as the owner of the jobs it follows (`store.leases`).
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{secrets_module.token_hex(3)}"
        self.store = JobStore(self.db.engine, owner=self.process_id, lease_s=config.jobs.lease_s)
        self.leases = Leases(self.db.engine, self.process_id, config.jobs.lease_s, presence=not self.db.is_sqlite)
        self.attempts = AttemptStore(self.db.engine)
        self.events = JobEvents()
        self.pool = ProviderPool(config, self.metrics, clock, upstreams)
        self.prober = Prober(pool=self.pool, store=HealthStore(self.db.engine), clock=clock)
        secrets = config.images.secrets() or [load_or_create_secret(Path(config.data_dir) / "signing.key")]
        s3_secret = config.images.s3.secret_access_key if config.images.s3 else None
        admin_token = config.server.admin_token or ""
        logs.redact([*secrets, *(p.secret for p in config.providers), s3_secret or "", admin_token])
        self.images = image_store(config, secrets)
        self.finisher = Finisher(self.store, self.events, self.metrics, clock)
        self.lifecycle = Lifecycle(
            config=config,
            store=self.store,
            pool=self.pool,
            images=self.images,
            finisher=self.finisher,
            events=self.events,
            clock=clock,
        )
        if not self.db.is_sqlite:  # alone on SQLite, no other process can take a job this one follows
            self.lifecycle.leases = self.leases
        self.tracker = Tracker(
            config=config,
            store=self.store,
            pool=self.pool,
            lifecycle=self.lifecycle,
            finisher=self.finisher,
            clock=clock,
        )
        self.submitter = Submitter(
            config=config,
            store=self.store,
            keys=self.keys,
            pool=self.pool,
            lifecycle=self.lifecycle,
            finisher=self.finisher,
            clock=clock,
        )
        self.jobs = JobService(
            config=config,
            store=self.store,
            submitter=self.submitter,
            lifecycle=self.lifecycle,
            events=self.events,
            attempts=self.attempts,
            clock=clock,
        )
        self.coordinator = Coordinator(
            leases=self.leases,
            attempts=self.attempts,
            tracker=self.tracker,
            lifecycle=self.lifecycle,
            clock=clock,
            alone=self.db.is_sqlite,
            on_adopted=self._watch_hooks,
            retry_window_s=self.jobs.retry_window_s,
        )
        self.maybe_sent = MaybeSent(
            leases=self.leases,
            store=self.store,
            pool=self.pool,
            tracker=self.tracker,
            follow=self.coordinator.follow_claimed,
            submitting=self.submitter.submitting,
            metrics=self.metrics,
            clock=clock,
        )
        self.upstream_hooks = UpstreamHooks(
            config=config,
            secrets=secrets,
            pool=self.pool,
            lifecycle=self.lifecycle,
            store=self.store,
            clock=clock,
            metrics=self.metrics,
            submitting=self.submitter.submitting,
            submitting_to=self.submitter.submitting_to,
            leases=self.leases,
            follow=self.coordinator.follow_claimed,
            watch=self._watch_hooks,
            alone=self.db.is_sqlite,
        )
        if not self.db.is_sqlite:  # a retry for another process's job: that process may be gone
            self.jobs.held_elsewhere = self.coordinator.adopt_soon
            self.upstream_hooks.held_elsewhere = self.coordinator.adopt_soon
        logs.redact(self.upstream_hooks.tokens())
        # Processes sharing a PostgreSQL database wake each other's waiters and forward upstream hooks.
        self.broadcast: Broadcast | None = None
        if not self.db.is_sqlite:
            self.broadcast = Broadcast(
                config.database_url(), self.process_id, self.events, self.upstream_hooks.forwarded, clock.now
            )
            self.upstream_hooks.forward = self.broadcast.forward_hook
        self.submitter.hook_url = self.upstream_hooks.url
        self.tracker.submitting = self.submitter.submitting  # the pending sweep leaves those alone
        self.tracker.watch = self._watch_hooks  # and tells the clients of those it ends
        if not self.db.is_sqlite:
            self.submitter.slots = Slots(self.db.engine, config.jobs.lease_s, self.process_id)
        references = config.api.references
        self.egress = Egress(references.allow_private, references.allow_hosts)
        self.notifier = Notifier(
            config=config.hooks,
            egress=self.egress,
            events=self.events,
            store=self.store,
            metrics=self.metrics,
            clock=clock,
        )
        self.uploads = Uploads(self.images, clock, self.keys, config.api.uploads)
        self.tasks = TaskService(
            config=config,
            store=self.store,
            pool=self.pool,
            submitter=self.submitter,
            lifecycle=self.lifecycle,
            notifier=self.notifier,
            uploads=self.uploads,
            clock=clock,
        )
        self.auth = Authenticator(self.keys, now=clock.now)  # expiry on the same clock as holds and the admin API
        self.references = ReferenceLoader(references, egress=self.egress)  # one set of lookup threads
        self.ready = False
        self.started_at = int(clock.now())
        self.version = _version()
        self.openapi: dict[str, Any] | None = None  # built on first request

    async def open(self) -> None:
        await self.images.open()  # first: a bucket that cannot be used stops the start before anything is open
        await self.db.migrate()
        await self.prober.start()
        if self.broadcast is not None:
            await self.broadcast.start()
        await self.leases.register(self.clock.now())
        await self.tracker.start()
        await self.coordinator.start()
        await self.maybe_sent.start()
        self.gc_pauses.install()
        self.ready = True

    async def _watch_hooks(self, rows: list[JobRow]) -> None:
        """Client hooks of jobs this process adopted (a previous run's, or a dead process's) or that its pending
        sweep ends go on here; a job that gave no hook is passed over. Their image links use `server.public_url`
        (the address the task was submitted on is not kept), else the listening address."""
        server = self.config.server
        host = "127.0.0.1" if server.host in ("", "0.0.0.0", "::") else server.host
        host = f"[{host}]" if ":" in host else host  # an IPv6 address is bracketed in a URL
        base = server.public_url or f"http://{host}:{server.port}"
        secrets: dict[str, str | None] = {}
        for row in rows:
            if not row.notify_hook:
                continue
            if row.key_id not in secrets:
                key = await self.keys.get(row.key_id)
                secrets[row.key_id] = key.hook_secret if key else None
            secret = secrets[row.key_id]
            if secret:
                self.notifier.watch(row.id, row.notify_hook, secret, base, row.key_id)

    async def close(self) -> None:
        self.ready = False
        self.gc_pauses.remove()
        await self.coordinator.stop_adopting()  # first: jobs claimed from now on would be followed by nobody
        await self.maybe_sent.stop()
        await self.upstream_hooks.close()
        await self.submitter.close()
        await self.jobs.close()
        await self.tracker.stop()
        await self.coordinator.stop()  # after the last job write: hands this process's leases over
        if self.broadcast is not None:
            await self.broadcast.stop()
        await self.prober.stop()
        # Before the HTTP clients close under a submit the upstream answers late; and before the client hooks stop:
        # a submit refused then ends its job here, and nobody else sends that end.
        await self.submitter.drain()
        await self.notifier.close()
        await self.pool.aclose()
        await self.references.aclose()
        await self.images.close()
        await self.db.dispose()


def _version() -> str:
    try:
        return version("mj-relay")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree that was never installed
        return "0+unknown"
